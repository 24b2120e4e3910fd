"""DICOM SEG and SR writers: round trips through pydicom and highdicom on the real test DICOMs."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from mmcli.errors import CaseError, ReadError
from mmcli.io.dicom_out import AlgorithmInfo, write_dicom_seg, write_dicom_sr
from mmcli.io.dicom_sc import RESEARCH_NOTICE, write_dicom_sc
from mmcli.io.readers import read_radiograph
from mmcli.qa.mask import LEFT_LUNG, RIGHT_LUNG, lung_sides

DATA = Path(__file__).parent / "data" / "dicom"
SOURCES = sorted(DATA.glob("*.dcm"))
ALGORITHM = AlgorithmInfo(version="0.1.0", weights_name="multimix-test", weights_sha256="0123456789abcdef" * 4)
PNEUMONIA = ("233604007", "SCT")
NORMAL = ("17621005", "SCT")
RIGHT, LEFT = ("3341006", "SCT"), ("44029006", "SCT")
SIDE_AREAS = (23210.5, 20000.0)


def _header(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def _blob(rows: int, cols: int) -> np.ndarray:
    """A hand-made (rows, cols) bool mask: two off-centre ellipses and a one-pixel corner."""
    y, x = np.ogrid[:rows, :cols]
    left = ((y - rows * 0.45) / (rows * 0.3)) ** 2 + ((x - cols * 0.3) / (cols * 0.12)) ** 2 <= 1
    right = ((y - rows * 0.5) / (rows * 0.28)) ** 2 + ((x - cols * 0.7) / (cols * 0.13)) ** 2 <= 1
    mask = left | right
    mask[0, cols - 1] = True  # catches a transposed or flipped frame
    return mask


def _items(ds: pydicom.Dataset, meaning: str) -> list[pydicom.Dataset]:
    """All SR content items (any depth) whose concept name means ``meaning``."""
    found = []
    for item in ds.get("ContentSequence", []):
        if item.ConceptNameCodeSequence[0].CodeMeaning == meaning:
            found.append(item)
        found.extend(_items(item, meaning))
    return found


def _code(item: pydicom.Dataset) -> tuple[str, str]:
    concept = item.ConceptCodeSequence[0]
    return concept.CodeValue, concept.CodingSchemeDesignator


@pytest.fixture(scope="module", params=SOURCES, ids=[p.name[:16] for p in SOURCES])
def written(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    source: Path = request.param
    out = tmp_path_factory.mktemp("dicom_out")
    hdr = _header(source)
    mask = _blob(hdr.Rows, hdr.Columns)
    seg = write_dicom_seg(source, mask, out / "lung.seg.dcm", algorithm=ALGORITHM)
    sr = write_dicom_sr(source, out / "findings.sr.dcm", p_pneumonia=0.8125, label="pneumonia", lung_area_mm2=43210.5,
                        qa_flags=["low_contrast", "lung_touches_border"], algorithm=ALGORITHM, seg=seg,
                        side_areas_mm2=SIDE_AREAS)
    pixels = read_radiograph(source).pixels
    sc = write_dicom_sc(source, pixels, lung_sides(mask), out / "overlay.sc.dcm", p_pneumonia=0.8125,
                        label="uncertain", qa_flags=["rotated"], algorithm=ALGORITHM)
    return {"source": source, "hdr": hdr, "mask": mask, "seg": seg, "sr": sr, "sc": sc, "out": out, "pixels": pixels}


def test_seg_round_trip(written: dict) -> None:
    hdr, mask = written["hdr"], written["mask"]
    seg = hd.seg.segread(written["seg"])
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    sides = lung_sides(mask)
    frames = seg.pixel_array.astype(bool)  # (2, H, W): frame k holds segment k
    assert frames.shape == (2, hdr.Rows, hdr.Columns) and frames[0].any() and frames[1].any()
    np.testing.assert_array_equal(frames[0], sides == RIGHT_LUNG)
    np.testing.assert_array_equal(frames[1], sides == LEFT_LUNG)
    np.testing.assert_array_equal(frames.any(axis=0), mask)
    cols = np.arange(hdr.Columns)
    assert (frames[0] * cols).sum() / frames[0].sum() < (frames[1] * cols).sum() / frames[1].sum()  # right: image left
    assert (seg.Rows, seg.Columns) == (hdr.Rows, hdr.Columns)
    assert seg.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    ref = seg.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == hdr.SeriesInstanceUID
    assert ref.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == hdr.SOPInstanceUID
    assert seg.StudyInstanceUID == hdr.StudyInstanceUID
    assert seg.get("PatientID", "") == hdr.get("PatientID", "")
    assert seg.SeriesInstanceUID != hdr.SeriesInstanceUID and seg.SOPInstanceUID != hdr.SOPInstanceUID
    assert "research use" in seg.SeriesDescription and seg.ContentQualification == "RESEARCH"
    assert seg.Manufacturer == "mmcli"
    assert seg.PatientOrientation == hdr.get("PatientOrientation", "")  # Type 2C: no Frame of Reference
    assert len(seg.get("PatientAge") or "nnnY") == 4  # an invalid source value ("62") is not copied
    assert [f.SegmentIdentificationSequence[0].ReferencedSegmentNumber
            for f in seg.PerFrameFunctionalGroupsSequence] == [1, 2]
    assert len(seg.SegmentSequence) == 2
    for segment, number, label, code in zip(seg.SegmentSequence, (1, 2), ("Right lung", "Left lung"), (RIGHT, LEFT),
                                            strict=True):
        assert (segment.SegmentNumber, segment.SegmentLabel, segment.SegmentAlgorithmType) == \
            (number, label, "AUTOMATIC")
        category = segment.SegmentedPropertyCategoryCodeSequence[0]
        kind = segment.SegmentedPropertyTypeCodeSequence[0]
        assert (category.CodeValue, category.CodingSchemeDesignator) == ("91723000", "SCT")
        assert (kind.CodeValue, kind.CodingSchemeDesignator) == code
        algo = segment.SegmentationAlgorithmIdentificationSequence[0]
        assert (algo.AlgorithmName, algo.AlgorithmVersion) == ("mmcli", "0.1.0")
        assert ALGORITHM.weights_sha256 in algo.AlgorithmParameters and "multimix-test" in algo.AlgorithmParameters
        assert algo.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"  # Artificial Intelligence


def test_sr_round_trip(written: dict) -> None:
    hdr = written["hdr"]
    seg_uid = _header(written["seg"]).SOPInstanceUID
    sr = hd.sr.srread(written["sr"])
    assert sr.Modality == "SR" and sr.StudyInstanceUID == hdr.StudyInstanceUID
    assert sr.get("PatientID", "") == hdr.get("PatientID", "")
    assert "research use" in sr.SeriesDescription and sr.Manufacturer == "mmcli"
    [group] = sr.content.get_image_measurement_groups()
    assert (group.finding_type.value, group.finding_type.scheme_designator) == PNEUMONIA
    prob, total = group.get_measurements()  # the sides' areas are in their segments' groups
    assert (prob.name.value, prob.value) == ("122157", 0.8125)
    assert (total.name.value, total.value, total.unit.value) == ("42798000", 43210.5, "mm2")
    assert (prob.unit.value, prob.unit.scheme_designator) == ("1", "UCUM")
    assert group.source_images[0].referenced_sop_instance_uid == hdr.SOPInstanceUID
    assert [i.TextValue for i in _items(sr, "Quality Finding")] == ["low_contrast", "lung_touches_border"]
    assert [i.TextValue for i in _items(sr, "Algorithm Name")] == ["mmcli"] * 3
    assert {i.TextValue for i in _items(sr, "Algorithm Version")} == {"0.1.0"}
    rois = sr.content.get_planar_roi_measurement_groups()
    assert [(r.finding_type.value, r.finding_type.scheme_designator) for r in rois] == [RIGHT, LEFT]
    refs = [ref for item in _items(sr, "Referenced Segmentation Frame") for ref in item.ReferencedSOPSequence]
    assert [(r.ReferencedSOPInstanceUID, r.ReferencedSegmentNumber) for r in refs] == [(seg_uid, 1), (seg_uid, 2)]
    assert not any("ReferencedFrameNumber" in r for r in refs)
    for roi, expected in zip(rois, SIDE_AREAS, strict=True):
        [area] = roi.get_measurements()
        assert (area.name.value, area.value, area.unit.value) == ("42798000", expected, "mm2")
    evidence = {ref.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                for series in s.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}
    assert evidence == {hdr.SOPInstanceUID, seg_uid}


def test_sc_round_trip(written: dict) -> None:
    hdr, sides = written["hdr"], lung_sides(written["mask"])
    sc = pydicom.dcmread(written["sc"])
    assert sc.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage and sc.Modality == "OT"
    assert sc.StudyInstanceUID == hdr.StudyInstanceUID and sc.get("PatientID", "") == hdr.get("PatientID", "")
    assert sc.SeriesInstanceUID not in (hdr.SeriesInstanceUID, _header(written["seg"]).SeriesInstanceUID)
    assert sc.SeriesNumber == 992 and "research use" in sc.SeriesDescription and sc.Manufacturer == "mmcli"
    assert sc.BurnedInAnnotation == "YES" and sc.ConversionType == "WSD" and sc.ImageType[0] == "DERIVED"
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == hdr.SOPInstanceUID
    assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3 and sc.BitsAllocated == 8
    assert (sc.DateOfSecondaryCapture, sc.ContentDate) == (_fixed(hdr), _fixed(hdr))
    image = sc.pixel_array
    # the film (shrunk to 2048 on its long side) under a black band with the text
    scale = min(1.0, 2048 / max(hdr.Rows, hdr.Columns))
    film_h, film_w = round(hdr.Rows * scale), round(hdr.Columns * scale)
    assert image.shape[1] == max(film_w, image.shape[1]) and image.shape[0] > film_h
    band = image[: image.shape[0] - film_h]
    red = (band[..., 0] > 200) & (band[..., 1] < 120) & (band[..., 2] < 120)  # the research notice
    white = (band > 200).all(axis=-1)  # the findings
    assert red[: band.shape[0] // 4].any() and white.any() and not (band[-2:] > 0).any()
    film = image[-film_h:]
    cyan = (film[..., 0] == 0) & (film[..., 1] == 230) & (film[..., 2] == 255)
    yellow = (film[..., 0] == 255) & (film[..., 1] == 210) & (film[..., 2] == 0)
    cols = np.arange(film.shape[1])
    assert cyan.any() and yellow.any() and (cyan * cols).sum() / cyan.sum() < (yellow * cols).sum() / yellow.sum()
    assert (sides == RIGHT_LUNG).any()


def _fixed(hdr: pydicom.Dataset) -> str:
    return str(hdr.get("StudyDate") or hdr.get("SeriesDate") or hdr.get("ContentDate") or "19000101")


def test_render_overlay_widens_a_small_film_for_its_text() -> None:
    from mmcli.io.dicom_sc import render_overlay

    film = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    sides = np.zeros((64, 64), np.uint8)
    sides[10:50, 8:28], sides[10:50, 36:56] = RIGHT_LUNG, LEFT_LUNG
    image = render_overlay(film, sides, ["p(pneumonia) 0.500    label: normal"])
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[1] > 64 and image.shape[0] > 64  # as wide as the notice, the film centred below it
    film_part = image[-64:, (image.shape[1] - 64) // 2: (image.shape[1] - 64) // 2 + 64]
    assert (film_part[10, 8:28] == (0, 230, 255)).all()  # the top edge of the right lung, in cyan
    assert (film_part[10, 36:56] == (255, 210, 0)).all()
    assert (film_part[30, 12:24] == film_part[30, 12:24, :1]).all()  # inside a lung: the grey film


def test_sc_without_pixels_or_of_the_wrong_size_is_a_case_error(tmp_path: Path) -> None:
    common = {"p_pneumonia": 0.5, "label": "normal", "qa_flags": [], "algorithm": ALGORITHM}
    with pytest.raises(CaseError, match="pixels were not kept"):
        write_dicom_sc(SOURCES[0], None, None, tmp_path / "sc.dcm", **common)
    with pytest.raises(CaseError, match=r"film shape \(10, 10\) differs"):
        write_dicom_sc(SOURCES[0], np.zeros((10, 10)), None, tmp_path / "sc.dcm", **common)
    assert not list(tmp_path.iterdir())
    assert RESEARCH_NOTICE == "RESEARCH USE ONLY \u2014 not for diagnosis"


def test_same_inputs_same_bytes(written: dict) -> None:
    out = written["out"] / "again"
    seg = write_dicom_seg(written["source"], written["mask"], out / "lung.seg.dcm", algorithm=ALGORITHM)
    sr = write_dicom_sr(written["source"], out / "findings.sr.dcm", p_pneumonia=0.8125, label="pneumonia",
                        lung_area_mm2=43210.5, qa_flags=["low_contrast", "lung_touches_border"],
                        algorithm=ALGORITHM, seg=seg, side_areas_mm2=SIDE_AREAS)
    sc = write_dicom_sc(written["source"], written["pixels"], lung_sides(written["mask"]), out / "overlay.sc.dcm",
                        p_pneumonia=0.8125, label="uncertain", qa_flags=["rotated"], algorithm=ALGORITHM)
    assert seg.read_bytes() == written["seg"].read_bytes()
    assert sr.read_bytes() == written["sr"].read_bytes()
    assert sc.read_bytes() == written["sc"].read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["findings.sr.dcm", "lung.seg.dcm", "overlay.sc.dcm"]


def test_other_weights_other_uids(tmp_path: Path) -> None:
    source = DATA / "RG1_J2KI.dcm"
    mask = np.zeros((1955, 1841), np.uint8)  # a label map: no lung, two empty frames
    other = AlgorithmInfo(version="0.1.0", weights_name="other", weights_sha256="f" * 64)
    a = _header(write_dicom_seg(source, mask, tmp_path / "a.dcm", algorithm=ALGORITHM))
    b = hd.seg.segread(write_dicom_seg(source, mask, tmp_path / "b.dcm", algorithm=other))
    assert a.SOPInstanceUID != b.SOPInstanceUID and a.SeriesInstanceUID != b.SeriesInstanceUID
    assert not b.pixel_array.any() and b.NumberOfFrames == 2
    assert "PixelMeasuresSequence" not in b.SharedFunctionalGroupsSequence[0]  # source spacing is 0\0


def test_sr_without_seg_normal_no_flags(tmp_path: Path) -> None:
    source = DATA / "cxr.dcm"  # no patient module at all
    sr = hd.sr.srread(write_dicom_sr(source, tmp_path / "sr.dcm", p_pneumonia=0.03, label="normal",
                                     lung_area_mm2=51000.0, qa_flags=[], algorithm=ALGORITHM,
                                     side_areas_mm2=(27000.0, 24000.0)))
    [group] = sr.content.get_image_measurement_groups()
    assert (group.finding_type.value, group.finding_type.scheme_designator) == NORMAL
    measured = [(m.name.value, m.value, m.unit.value, m.finding_sites[0].value.value if m.finding_sites else None)
                for m in group.get_measurements()]
    assert measured == [("122157", 0.03, "1", None), ("42798000", 51000.0, "mm2", "39607008"),
                        ("42798000", 27000.0, "mm2", RIGHT[0]), ("42798000", 24000.0, "mm2", LEFT[0])]
    assert not sr.content.get_planar_roi_measurement_groups() and not _items(sr, "Quality Finding")
    assert sr.PatientID == "" and sr.ContentDate == "20160804"


def test_sr_with_nothing_known(tmp_path: Path) -> None:
    source = DATA / "Fake_MONOHR1.dcm"
    sr = hd.sr.srread(write_dicom_sr(source, tmp_path / "sr.dcm", p_pneumonia=None, label=None,
                                     lung_area_mm2=None, qa_flags=["unreadable_lungs"], algorithm=ALGORITHM))
    [group] = sr.content.get_image_measurement_groups()
    assert group.finding_type is None and not group.get_measurements()
    assert [i.TextValue for i in _items(sr, "Quality Finding")] == ["unreadable_lungs"]


def test_source_without_spacing_or_dates(tmp_path: Path) -> None:
    ds = pydicom.dcmread(DATA / "cxr.dcm", stop_before_pixels=True)
    for keyword in ("PixelSpacing", "ImagerPixelSpacing", "StudyDate", "StudyTime", "SeriesDate", "SeriesTime",
                    "ContentDate", "ContentTime"):
        delattr(ds, keyword)
    ds.save_as(tmp_path / "bare.dcm")
    mask = _blob(ds.Rows, ds.Columns)
    seg = hd.seg.segread(write_dicom_seg(tmp_path / "bare.dcm", mask, tmp_path / "seg.dcm", algorithm=ALGORITHM))
    np.testing.assert_array_equal(seg.pixel_array.astype(bool).any(axis=0), mask)
    assert (seg.ContentDate, seg.ContentTime, seg.InstanceCreationDate) == ("19000101", "000000", "19000101")


def test_mask_of_wrong_size_is_a_case_error(tmp_path: Path) -> None:
    with pytest.raises(CaseError, match=r"Rows x Columns \(1024, 1024\)"):
        write_dicom_seg(SOURCES[0], np.ones((1024, 1023), bool), tmp_path / "seg.dcm", algorithm=ALGORITHM)
    with pytest.raises(CaseError, match="boolean"):
        write_dicom_seg(SOURCES[0], np.full((1024, 1024), 0.5), tmp_path / "seg.dcm", algorithm=ALGORITHM)
    with pytest.raises(CaseError, match="left lung"):
        write_dicom_seg(SOURCES[0], np.full((1024, 1024), 3, np.uint8), tmp_path / "seg.dcm", algorithm=ALGORITHM)
    assert not list(tmp_path.iterdir())


def test_unusable_sources_and_values_are_case_errors(tmp_path: Path) -> None:
    ds = pydicom.dcmread(DATA / "Fake_MONOHR1.dcm", stop_before_pixels=True)
    del ds.SOPInstanceUID
    ds.save_as(tmp_path / "no_uid.dcm", enforce_file_format=False)
    (tmp_path / "text.dcm").write_text("not a DICOM file")
    mask = np.zeros((1024, 1024), bool)
    with pytest.raises(CaseError, match="no SOPInstanceUID"):
        write_dicom_seg(tmp_path / "no_uid.dcm", mask, tmp_path / "seg.dcm", algorithm=ALGORITHM)
    with pytest.raises(CaseError, match="cannot read the source DICOM"):
        write_dicom_seg(tmp_path / "text.dcm", mask, tmp_path / "seg.dcm", algorithm=ALGORITHM)
    common = {"lung_area_mm2": None, "qa_flags": [], "algorithm": ALGORITHM}
    with pytest.raises(CaseError, match="not in"):
        write_dicom_sr(SOURCES[0], tmp_path / "sr.dcm", p_pneumonia=1.5, label=None, **common)
    with pytest.raises(CaseError, match="no SR code"):
        write_dicom_sr(SOURCES[0], tmp_path / "sr.dcm", p_pneumonia=0.5, label="covid", **common)
    with pytest.raises(CaseError, match="not a DICOM SEG"):
        write_dicom_sr(SOURCES[0], tmp_path / "sr.dcm", p_pneumonia=0.5, label=None, seg=DATA / "cxr.dcm", **common)


def test_predict_writes_seg_and_sr_for_dicom_inputs_only(tmp_path, tiny_weights):
    import shutil

    import highdicom as hd
    from conftest import rows_by_case, save_png8
    from typer.testing import CliRunner

    from mmcli.cli import app
    from mmcli.io.writers import read_mask_png

    scans = tmp_path / "scans"
    shutil.copytree(DATA, scans)
    save_png8(scans / "plain.png", 64, 64)
    out = tmp_path / "r.csv"
    res = CliRunner().invoke(app, ["predict", str(scans), "--out", str(out), "-w", str(tiny_weights), "-q", "-j", "0",
                                   "--dicom-seg", "--dicom-sr", "--dicom-sc"])
    assert res.exit_code == 0, res.output
    rows = rows_by_case(out)
    assert rows["plain"]["status"] == "ok"
    assert rows["plain"]["dicom_seg"] == rows["plain"]["dicom_sr"] == rows["plain"]["dicom_sc"] == ""
    dicoms = [r for k, r in rows.items() if k != "plain"]
    assert len(dicoms) == len(list(DATA.glob("*.dcm")))
    for row in dicoms:
        seg = hd.seg.segread(tmp_path / row["dicom_seg"])
        source = pydicom.dcmread(row["source"], stop_before_pixels=True)
        assert seg.StudyInstanceUID == source.StudyInstanceUID
        assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == \
            source.SOPInstanceUID
        assert (seg.Rows, seg.Columns) == (int(row["height"]), int(row["width"]))
        frames = seg.pixel_array.astype(bool)
        np.testing.assert_array_equal(frames.any(axis=0), read_mask_png(tmp_path / row["mask"]))
        for frame, side in zip(frames, ("right", "left"), strict=True):
            assert frame.mean() == pytest.approx(float(row[f"{side}_lung_fraction"]), abs=1e-6)
        sr = hd.sr.srread(tmp_path / row["dicom_sr"])
        assert sr.StudyInstanceUID == source.StudyInstanceUID and "research use" in sr.SeriesDescription
        sc = pydicom.dcmread(tmp_path / row["dicom_sc"])
        assert row["dicom_sc"] == f"r/dicom/{row['case_id']}.sc.dcm" and not row["dicom_error"]
        assert sc.StudyInstanceUID == source.StudyInstanceUID and sc.SeriesInstanceUID != source.SeriesInstanceUID
        assert sc.BurnedInAnnotation == "YES" and sc.SourceImageSequence[0].ReferencedSOPInstanceUID == \
            source.SOPInstanceUID
    res = CliRunner().invoke(app, ["predict", str(scans), "--out", str(tmp_path / "a.csv"), "-w", str(tiny_weights),
                                   "--dicom-seg", "--anonymize-ids", str(tmp_path / "ids.json")])
    assert res.exit_code == 2 and "cannot be combined with --anonymize-ids" in res.output


DCIODVFY = shutil.which("dciodvfy")
needs_dciodvfy = pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (Debian package dicom3tools) is not installed")


def _dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


@needs_dciodvfy
def test_seg_sr_and_sc_pass_dciodvfy(written: dict) -> None:
    assert _dciodvfy_errors(written["seg"]) == []
    assert _dciodvfy_errors(written["sr"]) == []
    assert _dciodvfy_errors(written["sc"]) == []


def _malformed(tmp_path: Path) -> Path:
    """RG1 with a birth date in ISO form, an impossible study time and a lone code-extension character set."""
    ds = pydicom.dcmread(DATA / "RG1_J2KI.dcm", stop_before_pixels=True)
    quiet = logging.getLogger("pydicom")
    level, quiet.level = quiet.level, logging.ERROR  # it logs each value it re-encodes for the new set
    with warnings.catch_warnings():  # pydicom warns about the invalid values set here
        warnings.simplefilter("ignore")
        ds.SpecificCharacterSet = "ISO 2022 IR 87"
        ds.PatientName = "\x1b$B%d%^%@\x1b(B^\x1b$B%?%m%&\x1b(B".encode("latin-1")  # ヤマダ^タロウ in ISO 2022 JP
        ds.PatientBirthDate = "1956-03-14"
        ds.StudyTime = "25:99:99"
        ds.save_as(tmp_path / "malformed.dcm")
    quiet.level = level
    return tmp_path / "malformed.dcm"


def test_malformed_source_attributes_are_left_out_not_fatal(tmp_path: Path) -> None:
    source = _malformed(tmp_path)
    hdr = _header(DATA / "RG1_J2KI.dcm")
    mask = _blob(hdr.Rows, hdr.Columns)
    seg = write_dicom_seg(source, mask, tmp_path / "seg.dcm", algorithm=ALGORITHM)
    sr = write_dicom_sr(source, tmp_path / "sr.dcm", p_pneumonia=0.5, label="normal", lung_area_mm2=1.0,
                        qa_flags=[], algorithm=ALGORITHM, seg=seg)
    for path in (seg, sr):
        ds = pydicom.dcmread(path)
        assert ds.SpecificCharacterSet == "ISO_IR 192"  # the name is kept, in UTF-8
        assert str(ds.PatientName) == "ヤマダ^タロウ"
        assert ds.PatientBirthDate == "" and ds.StudyTime == ""  # Type 2: present, empty
        assert ds.PatientID == hdr.PatientID and ds.StudyDate == hdr.StudyDate  # valid values as they are
        assert (ds.ContentDate, ds.ContentTime) == (hdr.StudyDate, "000000")  # no valid study time
        if DCIODVFY is not None:
            assert _dciodvfy_errors(path) == []


def test_a_library_error_is_reported_without_header_values(tmp_path: Path) -> None:
    from mmcli.io.dicom_out import _build, _read_source

    src = _read_source(DATA / "RG1_J2KI.dcm")
    name = str(src.PatientName)

    def refuse() -> None:
        warnings.warn(f"odd name {name!r}", UserWarning, stacklevel=1)
        raise ValueError(f"cannot use {src.PatientID} / {name}")

    with pytest.raises(CaseError) as caught:
        _build(DATA / "RG1_J2KI.dcm", src, "DICOM SEG", refuse)
    assert caught.value.reason == "cannot build the DICOM SEG: ValueError: cannot use [header value] / [header value]"


MARKER = "ZQX7MARK31"  # fits every text VR (AE and SH hold 16 characters)
_FREE_TEXT = ("AE", "LO", "LT", "PN", "SH", "ST", "UC", "UT")
_PLANTED = ("PatientName", "PatientID", "PatientComments", "PatientAddress", "InstitutionName", "InstitutionAddress",
            "StudyDescription", "SeriesDescription", "ReferringPhysicianName", "OperatorsName", "AccessionNumber",
            "StudyID", "StationName", "DeviceSerialNumber", "ImageComments", "AdditionalPatientHistory",
            "RequestingPhysician", "Manufacturer", "ManufacturerModelName", "ProtocolName", "EthnicGroup",
            "Occupation", "DerivationDescription", "RequestedProcedureDescription", "PerformedProcedureStepID")


def _plant(ds: pydicom.Dataset) -> pydicom.Dataset:
    """``MARKER`` in every free-text attribute of ``ds`` (nested ones too), with the usual ones added."""
    for keyword in _PLANTED:
        setattr(ds, keyword, MARKER)
    ds.OtherPatientIDsSequence = [pydicom.Dataset()]
    ds.OtherPatientIDsSequence[0].PatientID = MARKER
    ds.OtherPatientIDsSequence[0].IssuerOfPatientID = MARKER
    for elem in ds.iterall():
        if elem.VR in _FREE_TEXT:
            elem.value = f"{MARKER}^{MARKER}" if elem.VR == "PN" else MARKER
    return ds


UNPARSABLE = "cannot parse DICOM header (BytesLengthException): malformed or unreadable element"


def _unparsable(source: Path, out: Path, where: str) -> Path:
    """``source`` with ``MARKER`` planted as the odd-length value of a binary element that pydicom
    cannot parse: its error quotes those bytes, which no decoded value (nothing to redact) holds.
    ``where``: ``"Rows"`` (parsed when read) or ``"meta"`` (the file meta group length: dcmread fails)."""
    bad = MARKER.encode() + b"!"
    if where == "meta":
        data = source.read_bytes()
        at = data.index(b"\x02\x00\x00\x00UL\x04\x00")
        out.write_bytes(data[:at] + b"\x02\x00\x00\x00UL" + len(bad).to_bytes(2, "little") + bad + data[at + 12:])
        return out
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(source)  # the marker nowhere else: nothing tells redact() about it
    ds[0x00280010] = RawDataElement(Tag(0x00280010), "US", len(bad), bad, 0, False, True)
    ds.save_as(out)
    return out


def test_an_unparsable_value_is_named_by_its_type_alone(tmp_path: Path) -> None:
    source = DATA / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
    for where in ("Rows", "meta"):
        with pytest.raises(ReadError) as caught:
            read_radiograph(_unparsable(source, tmp_path / f"{where}.dcm", where))
        assert caught.value.reason == UNPARSABLE, where  # a ReadError, without pydicom's text (it quotes the bytes)
    with pytest.raises(CaseError) as caught:
        write_dicom_sr(source, tmp_path / "sr.dcm", p_pneumonia=0.5, label="normal", lung_area_mm2=None, qa_flags=[],
                       algorithm=ALGORITHM, seg=tmp_path / "meta.dcm")
    assert caught.value.reason == "cannot read the DICOM SEG to reference (BytesLengthException)"


def test_header_elements_walk_nested_items_and_undecodable_values() -> None:
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    from mmcli.io.dicom import header_elements, header_texts

    ds = pydicom.Dataset()
    ds.PatientName = "Doe^Jane"
    ds.Rows = 4  # not text: not listed
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.OtherPatientIDsSequence = [pydicom.Dataset()]
    ds.OtherPatientIDsSequence[0].PatientID = "ID123"
    ds[0x00280011] = RawDataElement(Tag(0x00280011), "US", 3, b"abc", 0, False, True)  # Columns: odd length
    found = {(e.keyword, e.values) for e in header_elements(ds)}
    assert found == {("PatientName", ("Doe^Jane",)), ("ImageType", ("ORIGINAL", "PRIMARY")),
                     ("PatientID", ("ID123",)), ("", None)}
    assert header_texts(ds) == {"Doe^Jane", "Doe", "Jane", "ORIGINAL", "PRIMARY", "ORIGINAL\\PRIMARY", "ID123"}


def test_no_header_value_reaches_a_report_journal_log_or_error(tmp_path, tiny_weights):
    scans = tmp_path / "scans"
    scans.mkdir()
    source = DATA / "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"  # the smallest
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _plant(pydicom.dcmread(source)).save_as(scans / "marked.dcm")
        malformed = _plant(pydicom.dcmread(source))
        malformed.PatientBirthDate, malformed.StudyTime = "1956-03-14", "25:99:99"
        malformed.SpecificCharacterSet = "ISO 2022 IR 87"
        malformed.save_as(scans / "malformed.dcm")
        no_uid = _plant(pydicom.dcmread(source))
        del no_uid.SOPInstanceUID  # read and predicted, but no SEG or SR can reference it
        no_uid.save_as(scans / "no_uid.dcm", enforce_file_format=False)
        unreadable = _plant(pydicom.dcmread(source))
        unreadable.PhotometricInterpretation = MARKER  # a valid code string, but no image type
        unreadable.save_as(scans / "unreadable.dcm")
    _unparsable(source, scans / "odd_rows.dcm", "Rows")  # pydicom's errors quote these bytes
    _unparsable(source, scans / "odd_meta.dcm", "meta")
    out = tmp_path / "out" / "r.csv"
    res = subprocess.run([sys.executable, "-m", "mmcli", "-vv", "predict", str(scans), "--out", str(out), "--hdf5",
                          str(tmp_path / "out" / "r.h5"), "-w", str(tiny_weights), "-j", "1", "--dicom-seg",
                          "--dicom-sr", "--dicom-sc"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr  # the unreadable file fails; a missing DICOM output does not
    from conftest import rows_by_case

    rows = rows_by_case(out)
    assert [rows[c]["status"] for c in ("marked", "malformed", "no_uid", "unreadable")] == ["ok", "ok", "ok", "error"]
    for case in ("marked", "malformed"):
        assert rows[case]["dicom_seg"] and rows[case]["dicom_sr"] and rows[case]["dicom_sc"], rows[case]
        assert not rows[case]["dicom_error"]
    reason = "source DICOM has no SOPInstanceUID; cannot reference it from a SEG, SR or SC"
    assert rows["no_uid"]["dicom_error"] == "; ".join(f"DICOM {kind} not written: {reason}"
                                                      for kind in ("SEG", "SR", "SC"))
    assert rows["no_uid"]["p_pneumonia"] and not rows["no_uid"]["dicom_seg"] and not rows["no_uid"]["dicom_sc"]
    assert rows["unreadable"]["error"] == ("unsupported photometric interpretation (not a defined term): "
                                           "expected MONOCHROME1 or MONOCHROME2")
    for case in ("odd_rows", "odd_meta"):
        assert rows[case]["status"] == "error"
        assert rows[case]["error"] == UNPARSABLE
    checked = [p for p in (tmp_path / "out").rglob("*") if p.is_file() and p.suffix != ".dcm"]  # the DICOM
    assert {p.name for p in checked} >= {"r.csv", "r.h5", "journal.jsonl", "run.json"}  # objects carry the patient
    secrets = (MARKER, "1956-03-14", "25:99:99")
    for text in (res.stdout, res.stderr):
        assert not [s for s in secrets if s in text], text
    for path in checked:
        assert not [s for s in secrets if s.encode() in path.read_bytes()], path
    assert "DEBUG" in res.stderr and "no SOPInstanceUID" in res.stderr  # the log did run, and says why


def test_a_dicom_output_that_cannot_be_written_costs_no_prediction(tmp_path, tiny_weights, monkeypatch):
    from contextlib import contextmanager

    from conftest import read_rows
    from typer.testing import CliRunner

    import mmcli.io.dicom_out
    from mmcli.cli import app

    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copyfile(DATA / "Fake_MONOHR1.dcm", scans / "a.dcm")
    atomic_path = mmcli.io.dicom_out.atomic_path

    @contextmanager
    def full_disk_for_seg_and_sc(path: Path):
        if path.name.endswith((".seg.dcm", ".sc.dcm")):
            raise OSError(28, "No space left on device")
        with atomic_path(path) as tmp:
            yield tmp

    monkeypatch.setattr(mmcli.io.dicom_out, "atomic_path", full_disk_for_seg_and_sc)  # -j 0: the case runs here
    res = CliRunner().invoke(app, ["predict", str(scans), "--out", str(tmp_path / "r.csv"), "-w", str(tiny_weights),
                                   "-j", "0", "--dicom-seg", "--dicom-sr", "--dicom-sc", "-q"])
    assert res.exit_code == 0, res.output
    (row,) = read_rows(tmp_path / "r.csv")
    assert row["status"] == "ok" and row["p_pneumonia"] and row["mask"] and not row["error"]
    assert row["dicom_seg"] == "" and row["dicom_sr"] == "r/dicom/a.sr.dcm"  # the SR, without the SEG
    assert row["dicom_error"].startswith("DICOM SEG not written: cannot write a.seg.dcm")
    assert "; DICOM SC not written: cannot write a.sc.dcm" in row["dicom_error"] and row["dicom_sc"] == ""
    assert f"{scans / 'a.dcm'}: DICOM SEG not written" in res.output  # one warning line
