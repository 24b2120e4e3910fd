"""Write mmcli's results for one DICOM radiograph back as DICOM: a Segmentation and a Structured Report.

Both objects join the source's study (same StudyInstanceUID, patient and study modules
copied by highdicom), reference the source image, identify the algorithm (name, version,
weights name and sha256) and are marked research use (ContentQualification RESEARCH and the
series description). They are reproducible: the same inputs give a byte-identical file.

* UIDs come from ``generate_uid(entropy_srcs=[source SOPInstanceUID, weights sha256, kind, ...])``.
* Dates and times (Series, Content, Instance Creation, highdicom's Contribution DateTime) are
  the source's StudyDate/StudyTime, else its SeriesDate/Time or ContentDate/Time, else
  19000101 000000: the objects describe that examination; when a run happened belongs in
  the run manifest.

The source is read without pixel data, so its compression and photometric interpretation do
not matter; the SEG itself is written uncompressed (Explicit VR Little Endian, 1 bit per pixel).
No torch here.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import highdicom as hd
import numpy as np
import pydicom
from pydicom import config
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid
from pydicom.valuerep import validate_value

from mmcli.errors import CaseError
from mmcli.io.dicom import header_elements, redact
from mmcli.io.writers import atomic_path
from mmcli.qa.mask import LEFT_LUNG, RIGHT_LUNG, lung_sides

__all__ = ["AlgorithmInfo", "LABEL_CODES", "LUNG_SEGMENTS", "write_dicom_seg", "write_dicom_sr"]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

SEG_SERIES_NUMBER = 990
SR_SERIES_NUMBER = 991
SEG_DESCRIPTION = "mmcli lung mask (research use only)"
SR_DESCRIPTION = "mmcli findings (research use only)"
MANUFACTURER = "mmcli"
_FALLBACK_DATE, _FALLBACK_TIME = "19000101", "000000"

#: Coded values of the predicted label (the SR measurement group's "Finding").
LABEL_CODES: dict[str, hd.sr.CodedConcept] = {
    "pneumonia": hd.sr.CodedConcept("233604007", "SCT", "Pneumonia"),
    "normal": hd.sr.CodedConcept("17621005", "SCT", "Normal"),
}
_PROBABILITY = hd.sr.CodedConcept("122157", "DCM", "Probability")
_QUALITY_FINDING = hd.sr.CodedConcept("111052", "DCM", "Quality Finding")
_CHEST_XRAY = hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray")
_SEGMENTATION_FRAME = hd.sr.CodedConcept("121214", "DCM", "Referenced Segmentation Frame")
#: Segment number (the value in :func:`mmcli.qa.mask.lung_sides`' label map), label and SNOMED CT code of each lung
LUNG_SEGMENTS: tuple[tuple[int, str, hd.sr.CodedConcept], ...] = (
    (RIGHT_LUNG, "Right lung", hd.sr.CodedConcept("3341006", "SCT", "Right lung")),
    (LEFT_LUNG, "Left lung", hd.sr.CodedConcept("44029006", "SCT", "Left lung")),
)


@dataclass(frozen=True, kw_only=True)
class AlgorithmInfo:
    """What made the result: algorithm name and version, and the weights it ran with."""

    name: str = "mmcli"
    version: str
    weights_name: str
    weights_sha256: str


def write_dicom_seg(source: Path, sides: np.ndarray, out: Path, *, algorithm: AlgorithmInfo) -> Path:
    """Write a binary DICOM Segmentation of the lungs of ``source`` to ``out`` and return ``out``.

    ``sides`` is (H, W) at the source's native size (H, W = Rows, Columns): a label map of 0, 1 (the
    patient's right lung) and 2 (left lung), as :func:`mmcli.qa.mask.lung_sides` gives, or a bool lung mask
    that is split by it. Two segments (:data:`LUNG_SEGMENTS`), category SCT 91723000 Anatomical
    Structure: 1 "Right lung" (SCT 3341006) and 2 "Left lung" (SCT 44029006), algorithm type AUTOMATIC;
    one frame each, empty or not. Raises :class:`CaseError` when it cannot be written.
    """
    src = _read_source(source)
    sides = np.asarray(sides)
    if sides.shape != (src.Rows, src.Columns):
        raise CaseError(source, f"mask shape {sides.shape} differs from the DICOM's Rows x Columns "
                                f"({src.Rows}, {src.Columns})")
    if sides.dtype == bool:
        sides = lung_sides(sides)
    elif sides.dtype.kind not in "iuf" or not np.isin(sides, (0, RIGHT_LUNG, LEFT_LUNG)).all():
        raise CaseError(source, f"mask must be boolean or a label map of 0, {RIGHT_LUNG} (right lung) and "
                                f"{LEFT_LUNG} (left lung), got {sides.dtype}")
    sides = sides.astype(np.uint8)
    date, time = _fixed_datetime(src)

    def build() -> hd.seg.Segmentation:
        descriptions = [hd.seg.SegmentDescription(
            segment_number=number, segment_label=label,
            segmented_property_category=codes.SCT.AnatomicalStructure, segmented_property_type=code,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=hd.AlgorithmIdentificationSequence(
                name=algorithm.name, family=codes.cid7162.ArtificialIntelligence, version=algorithm.version,
                source=MANUFACTURER,
                parameters={"weights": algorithm.weights_name, "weights_sha256": algorithm.weights_sha256}),
            tracking_uid=_uid(src, algorithm, "seg", f"segment-{number}"), tracking_id=f"mmcli {label.lower()}",
        ) for number, label, code in LUNG_SEGMENTS]
        return hd.seg.Segmentation(
            source_images=[src], pixel_array=sides, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=_uid(src, algorithm, "seg", "series"), series_number=SEG_SERIES_NUMBER,
            sop_instance_uid=_uid(src, algorithm, "seg", "instance"), instance_number=1,
            manufacturer=MANUFACTURER, manufacturer_model_name=algorithm.name,
            software_versions=algorithm.version, device_serial_number=algorithm.weights_sha256[:16] or "unknown",
            omit_empty_frames=False,  # an empty mask is a result too
            series_description=SEG_DESCRIPTION, content_qualification=hd.ContentQualificationValues.RESEARCH,
            content_label="LUNGS", content_description="Automatic segmentation of the right and left lung",
            content_date=date, content_time=time, series_date=date, series_time=time,
            specific_character_set=_character_set(src),
        )

    seg = _build(source, src, "DICOM SEG", build)
    # Without a Frame of Reference highdicom 0.28 writes Pixel Measures without Slice Thickness
    # (valid, CP 1426) but hd.seg.segread() rejects that; the spacing stays in the referenced source
    shared = seg.SharedFunctionalGroupsSequence[0]
    if "PixelMeasuresSequence" in shared and "SliceThickness" not in shared.PixelMeasuresSequence[0]:
        del shared.PixelMeasuresSequence
    if "FrameOfReferenceUID" not in seg and "PatientOrientation" not in seg:
        seg.PatientOrientation = src.get("PatientOrientation", "")  # Type 2C without a Frame of Reference
    # highdicom draws the dimension organisation UID at random: fix it for reproducible bytes
    dim_uid = _uid(src, algorithm, "seg", "dimension")
    for item in seg.get("DimensionOrganizationSequence", []):
        item.DimensionOrganizationUID = dim_uid
    for item in seg.get("DimensionIndexSequence", []):
        item.DimensionOrganizationUID = dim_uid
    return _save(seg, out, date, time)


def write_dicom_sr(
    source: Path,
    out: Path,
    *,
    p_pneumonia: float | None,
    label: str | None,
    lung_area_mm2: float | None,
    qa_flags: Sequence[str],
    algorithm: AlgorithmInfo,
    seg: Path | None = None,
    side_areas_mm2: tuple[float | None, float | None] = (None, None),
) -> Path:
    """Write a TID 1500 Measurement Report (Comprehensive 3D SR) about ``source`` to ``out``.

    One image-level measurement group (TID 1501) holds the pneumonia probability (DCM 122157
    "Probability", unit UCUM "1" "no units", range 0..1), the label as the group's coded
    "Finding" (DCM 121071, highdicom's ``finding_type``): SCT 233604007 Pneumonia or SCT 17621005
    Normal, each QA flag as a TEXT item "Quality Finding" (DCM 111052), and the area of both lungs
    (SCT 42798000 "Area", UCUM "mm2", finding site SCT Lung). With a SEG (:func:`write_dicom_seg`), one
    planar ROI group (TID 1410) per lung references its segment, finding SCT Right lung / Left lung,
    with that lung's area from ``side_areas_mm2`` (right, left); without one, those areas go in the
    image-level group, each with its lung as finding site.
    Raises :class:`CaseError` when it cannot be written.
    """
    src = _read_source(source)
    if p_pneumonia is not None and not (math.isfinite(p_pneumonia) and 0.0 <= p_pneumonia <= 1.0):
        raise CaseError(source, f"pneumonia probability {p_pneumonia!r} is not in [0, 1]")
    if label is not None and label.lower() not in LABEL_CODES:
        raise CaseError(source, f"label {label!r} has no SR code; known: {', '.join(LABEL_CODES)}")
    for area in (lung_area_mm2, *side_areas_mm2):
        if area is not None and not (math.isfinite(area) and area >= 0):
            raise CaseError(source, f"lung area {area!r} mm2 is not a non-negative number")
    seg_ds = _read_seg(seg, src) if seg is not None else None
    date, time = _fixed_datetime(src)

    def build() -> hd.sr.Comprehensive3DSR:
        groups = _measurement_groups(src, p_pneumonia, label, (lung_area_mm2, *side_areas_mm2), qa_flags,
                                     algorithm, seg_ds)
        observer = hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=_uid(src, algorithm, "sr", "device"), name=algorithm.name,
                manufacturer_name=MANUFACTURER, model_name=algorithm.weights_name),
        )
        report = hd.sr.MeasurementReport(
            observation_context=hd.sr.ObservationContext(observer_device_context=observer),
            procedure_reported=_CHEST_XRAY, imaging_measurements=groups,
        )
        return hd.sr.Comprehensive3DSR(
            evidence=[src] if seg_ds is None else [src, seg_ds], content=report[0],
            series_instance_uid=_uid(src, algorithm, "sr", "series"), series_number=SR_SERIES_NUMBER,
            sop_instance_uid=_uid(src, algorithm, "sr", "instance"), instance_number=1,
            manufacturer=MANUFACTURER, is_complete=True,  # complete, but PRELIMINARY and UNVERIFIED
            series_description=SR_DESCRIPTION, content_qualification=hd.ContentQualificationValues.RESEARCH,
            content_date=date, content_time=time, series_date=date, series_time=time,
            specific_character_set=_character_set(src),
        )

    sr = _build(source, src, "DICOM SR", build)
    _segment_references_without_frame(sr)
    return _save(sr, out, date, time)


def _area(value: float | None, site: hd.sr.CodedConcept) -> hd.sr.Measurement | None:
    return None if value is None else hd.sr.Measurement(
        name=codes.SCT.Area, value=float(value), unit=codes.UCUM.SquareMillimeter,
        finding_sites=[hd.sr.FindingSite(anatomic_location=site)],
    )


_Group = hd.sr.MeasurementsAndQualitativeEvaluations | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations


def _measurement_groups(
    src: pydicom.Dataset, p_pneumonia: float | None, label: str | None,
    areas_mm2: tuple[float | None, float | None, float | None], qa_flags: Sequence[str], algorithm: AlgorithmInfo,
    seg_ds: pydicom.Dataset | None,
) -> list[_Group]:
    """The image-level group and, with a SEG, a ROI group per lung (see :func:`write_dicom_sr`);
    ``areas_mm2``: both lungs, right lung, left lung."""
    algorithm_id = hd.sr.AlgorithmIdentification(
        name=algorithm.name, version=algorithm.version, family=codes.DCM.ArtificialIntelligence,
        parameters=[f"weights={algorithm.weights_name}", f"weights_sha256={algorithm.weights_sha256}"],
    )
    side_areas = [_area(value, code) for value, (_, _, code) in zip(areas_mm2[1:], LUNG_SEGMENTS, strict=True)]
    measurements = [] if p_pneumonia is None else [
        hd.sr.Measurement(name=_PROBABILITY, value=float(p_pneumonia), unit=codes.UCUM.NoUnits)]
    measurements += [a for a in [_area(areas_mm2[0], codes.SCT.Lung), *([] if seg_ds else side_areas)] if a]
    image_group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=_uid(src, algorithm, "sr", "image-group"), identifier="mmcli image findings"),
        finding_type=None if label is None else LABEL_CODES[label.lower()],
        algorithm_id=algorithm_id,
        measurements=measurements or None,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(src)],
    )
    for flag in qa_flags:
        image_group[0].ContentSequence.append(hd.sr.TextContentItem(
            name=_QUALITY_FINDING, value=str(flag), relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    if seg_ds is None:
        return [image_group]
    groups: list[_Group] = [image_group]
    for (number, label_text, code), area in zip(LUNG_SEGMENTS, side_areas, strict=True):
        # frame k holds segment k (write_dicom_seg keeps empty frames); the frame number is dropped again
        # in _segment_references_without_frame
        segment = hd.sr.ReferencedSegmentationFrame(
            sop_class_uid=seg_ds.SOPClassUID, sop_instance_uid=seg_ds.SOPInstanceUID, frame_number=number,
            segment_number=number, source_image=hd.sr.SourceImageForSegmentation.from_source_image(src))
        groups.append(hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=_uid(src, algorithm, "sr", f"lung-group-{number}"),
                                                         identifier=f"mmcli {label_text.lower()}"),
            referenced_segment=segment, finding_type=code, algorithm_id=algorithm_id,
            measurements=None if area is None else [area],
        ))
    return groups


def _segment_references_without_frame(ds: pydicom.Dataset) -> None:
    """Reference each lung segment by its number alone (the SEG has one frame per segment).

    highdicom's Referenced Segmentation Frame item names both the frame and the segment, but the
    Image Reference Macro allows Referenced Segment Number only where Referenced Frame Number is
    absent (dciodvfy: "shall not be present when ReferencedFrameNumber is present"): the segment
    number selects that segment's frames.
    """
    for item in ds.get("ContentSequence", []):
        if item.ConceptNameCodeSequence[0].CodeValue == _SEGMENTATION_FRAME.value:
            for ref in item.get("ReferencedSOPSequence", []):
                if "ReferencedSegmentNumber" in ref and "ReferencedFrameNumber" in ref:
                    del ref.ReferencedFrameNumber
        _segment_references_without_frame(item)


def _read_source(source: Path) -> pydicom.Dataset:
    """The source header (no pixels), with what highdicom needs present and nothing invalid.

    Values the standard does not allow (a birth date ``1956-03-14``, a time ``25:99:99``, an
    age ``62``, a zero spacing) are left out rather than copied into the new objects; Type 2
    attributes highdicom reads unconditionally are then present, maybe empty.
    """
    try:
        with warnings.catch_warnings():  # pydicom's warnings quote header values: nothing shown
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(source, stop_before_pixels=True)
    except Exception as exc:  # pydicom raises many types on malformed headers
        raise CaseError(source, f"cannot read the source DICOM header ({type(exc).__name__})") from None
    for keyword in ("SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "Rows", "Columns"):
        if not ds.get(keyword):
            raise CaseError(source, f"source DICOM has no {keyword}; cannot reference it from a SEG, SR or SC")
    if _frames(ds) != 1:
        raise CaseError(source, "source DICOM is multi-frame; only single-frame images are supported")
    ds = copy.deepcopy(ds)
    _leave_out_invalid(ds)
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex",
                    "AccessionNumber", "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName"):
        if keyword not in ds:
            setattr(ds, keyword, "")
    if "PixelSpacing" in ds and not _valid_spacing(ds.PixelSpacing):
        del ds.PixelSpacing  # e.g. a zero spacing: not copied into the SEG's pixel measures
    return ds


def _frames(ds: pydicom.Dataset) -> int:
    try:
        return int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        return 0


# mmcli writes these itself or references them as they are; the character set is chosen apart
_KEPT = frozenset({"SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "SpecificCharacterSet"})


def _leave_out_invalid(ds: pydicom.Dataset) -> None:
    """Delete every text value of ``ds`` (nested items too) that its VR does not allow, and every element
    that cannot be decoded: copied as it is it would make the new objects invalid, or make highdicom refuse them."""
    for elem in header_elements(ds):
        if elem.values is not None and (elem.vr == "UI" or elem.keyword in _KEPT or _valid(elem.vr, elem.values)):
            continue
        del elem.ds[elem.tag]


def _valid(vr: str, values: Sequence[str]) -> bool:
    with warnings.catch_warnings():  # pydicom warns about invalid values, quoting them: nothing shown
        warnings.simplefilter("ignore")
        try:
            for value in values:
                validate_value(vr, value, config.RAISE)
        except Exception:  # noqa: BLE001 - invalid, or undecodable: either way not copied
            return False
    return True


_MULTI_BYTE_EXTENSIONS = frozenset({"ISO 2022 IR 87", "ISO 2022 IR 159", "ISO 2022 IR 149", "ISO 2022 IR 58"})


def _character_set(ds: pydicom.Dataset) -> str | list[str] | None:
    """The Specific Character Set of the new objects: the source's where the standard allows it, else UTF-8.

    The values are copied as pydicom decoded them, so UTF-8 (ISO_IR 192) holds them whatever the
    source's set was: e.g. ``ISO 2022 IR 87`` alone (a code extension with no Value 1) is not allowed.
    """
    raw = ds.get("SpecificCharacterSet")
    terms = [str(t).strip() for t in (raw if isinstance(raw, (list, tuple, MultiValue)) else [raw or ""])]
    if terms in ([], [""]):
        return None
    known = {v.value for v in hd.SpecificCharacterSetValues}
    extensions = {t for t in known if t.startswith("ISO 2022")}
    if len(terms) == 1 and terms[0] in known - extensions:
        return terms[0]
    if len(terms) > 1 and terms[0] not in _MULTI_BYTE_EXTENSIONS and all(t in extensions for t in terms[1:]) \
            and terms[0] in extensions | {""}:
        return ["ISO 2022 IR 6" if t == "" else t for t in terms]  # highdicom wants Value 1 spelled out
    return "ISO_IR 192"


def _valid_spacing(value: object) -> bool:
    try:
        spacing = [float(v) for v in value]  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return False
    return len(spacing) == 2 and all(math.isfinite(v) and v > 0 for v in spacing)


def _read_seg(seg: Path, src: pydicom.Dataset) -> pydicom.Dataset:
    try:
        ds = pydicom.dcmread(seg, stop_before_pixels=True)
    except Exception as exc:  # pydicom raises many types; their text may quote a value (redact cannot know it)
        raise CaseError(seg, f"cannot read the DICOM SEG to reference ({type(exc).__name__})") from None
    if ds.get("Modality") != "SEG" or ds.get("StudyInstanceUID") != src.StudyInstanceUID:
        raise CaseError(seg, "not a DICOM SEG of the same study as the source image")
    return ds


def _fixed_datetime(ds: pydicom.Dataset) -> tuple[str, str]:
    """The source's study (else series, else content) date and time; a fixed value if none."""
    for date_kw, time_kw in (("StudyDate", "StudyTime"), ("SeriesDate", "SeriesTime"), ("ContentDate", "ContentTime")):
        date = str(ds.get(date_kw) or "").strip()
        if len(date) == 8 and date.isdigit():
            time = str(ds.get(time_kw) or "").strip()
            return date, time if time[:6].isdigit() and len(time) >= 6 else _FALLBACK_TIME
    return _FALLBACK_DATE, _FALLBACK_TIME


def _uid(src: pydicom.Dataset, algorithm: AlgorithmInfo, kind: str, what: str) -> str:
    return generate_uid(entropy_srcs=[str(src.SOPInstanceUID), algorithm.weights_sha256, kind, what])


def _build(source: Path, src: pydicom.Dataset, what: str, make: Callable[[], _T]) -> _T:
    """Run highdicom: its errors become this case's CaseError, its warnings DEBUG log lines, both
    without any header value of ``src`` (:func:`mmcli.io.dicom.redact`)."""
    # e.g. "unlikely to represent the intended person name": the source's name is copied as it is
    with warnings.catch_warnings(record=True) as caught:  # filter local to the block; logged below
        warnings.simplefilter("always")
        try:
            return make()
        except Exception as exc:  # highdicom raises ValueError, TypeError, AttributeError...
            raise CaseError(source, redact(f"cannot build the {what}: {type(exc).__name__}: {exc}", src)) from None
        finally:
            for note in dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught):
                log.debug("%s: %s: %s", source, what, redact(note, src))


def _save(ds: pydicom.Dataset, out: Path, date: str, time: str) -> Path:
    """Write ``ds`` atomically, with the dates highdicom takes from the clock fixed to ``date``/``time``."""
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time
    for item in ds.get("ContributingEquipmentSequence", []):
        if item.get("ManufacturerModelName") == "highdicom":
            item.ContributionDateTime = date + time
    out = Path(out)
    try:
        with atomic_path(out) as tmp:
            ds.save_as(tmp, enforce_file_format=True)
    except OSError as exc:
        raise CaseError(out, f"cannot write {out.name}: {exc.strerror or exc}") from None
    return out
