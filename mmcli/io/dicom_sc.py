"""``--dicom-sc``: a DICOM Secondary Capture of a DICOM radiograph with mmcli's findings burned in,
for PACS viewers that show neither SEG nor SR.

The picture is the film (contrast stretched between its 0.5th and 99.5th percentiles, at most
``MAX_SIDE`` px on its long side) with the outline of each lung, under a black band that states
"RESEARCH USE ONLY — not for diagnosis", the pneumonia probability and label, the QA flags and
the algorithm. No header value of the source is drawn (no name, id or date): the viewer shows
those from the header, which the SC shares with the source's patient and study.

The object joins the source's study (same StudyInstanceUID, a new series), references the source
image (Source Image Sequence), is marked Burned In Annotation YES, and like the SEG and SR is
reproducible: same inputs, same bytes (:mod:`mmcli.io.dicom_out` gives the UIDs, dates and header).
It is written uncompressed: RGB, 8 bits, Explicit VR Little Endian.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import DA, TM
from scipy import ndimage as ndi

from mmcli.errors import CaseError
from mmcli.io.dicom_out import (
    MANUFACTURER,
    AlgorithmInfo,
    _build,
    _character_set,
    _fixed_datetime,
    _read_source,
    _save,
    _uid,
)
from mmcli.qa.mask import LEFT_LUNG, RIGHT_LUNG

__all__ = ["MAX_SIDE", "RESEARCH_NOTICE", "render_overlay", "write_dicom_sc"]

SC_SERIES_NUMBER = 992
SC_DESCRIPTION = "mmcli overlay (research use only)"
RESEARCH_NOTICE = "RESEARCH USE ONLY \u2014 not for diagnosis"
MAX_SIDE = 2048  # px: the film is shrunk to this on its long side (an SC is for looking, not measuring)
_OUTLINES = ((RIGHT_LUNG, (0, 230, 255)), (LEFT_LUNG, (255, 210, 0)))  # cyan, yellow
_NOTICE_COLOUR, _TEXT_COLOUR = (255, 80, 80), (255, 255, 255)


def write_dicom_sc(
    source: Path,
    pixels: np.ndarray | None,
    sides: np.ndarray | None,
    out: Path,
    *,
    p_pneumonia: float | None,
    label: str | None,
    qa_flags: Sequence[str],
    algorithm: AlgorithmInfo,
) -> Path:
    """Write the secondary capture of ``source`` to ``out`` and return ``out``.

    Args:
        pixels: (H, W) float film in [0, 1], 1 = bright, at the source's size (Rows, Columns).
        sides: (H, W) lung label map (:func:`mmcli.qa.mask.lung_sides`), or None: no outline.

    Raises:
        CaseError: it cannot be written (the reason quotes no header value).
    """
    src = _read_source(source)
    if pixels is None:
        raise CaseError(source, "the film's pixels were not kept for the secondary capture")
    size = (int(src.Rows), int(src.Columns))
    for what, array in (("film", pixels), ("mask", sides)):
        if array is not None and np.shape(array) != size:
            raise CaseError(source, f"{what} shape {np.shape(array)} differs from the DICOM's Rows x Columns {size}")
    lines = [
        f"p(pneumonia) {'n/a' if p_pneumonia is None else f'{p_pneumonia:.3f}'}    label: {label or 'none'}",
        f"QA flags: {', '.join(qa_flags) or 'none'}",
        "Lung outline: cyan = patient's right lung, yellow = patient's left lung" if sides is not None
        else "No lung outline (no lung mask)",
        f"{algorithm.name} {algorithm.version}, weights {algorithm.weights_name}",
    ]
    image = render_overlay(pixels, sides, lines)
    date, time = _fixed_datetime(src)

    def build() -> hd.sc.SCImage:
        return hd.sc.SCImage.from_ref_dataset(
            ref_dataset=src, pixel_array=image, photometric_interpretation="RGB", bits_allocated=8,
            coordinate_system="PATIENT", patient_orientation=("L", "F"),  # replaced by the source's below
            series_instance_uid=_uid(src, algorithm, "sc", "series"), series_number=SC_SERIES_NUMBER,
            sop_instance_uid=_uid(src, algorithm, "sc", "instance"), instance_number=1,
            manufacturer=MANUFACTURER, manufacturer_model_name=algorithm.name, software_versions=algorithm.version,
            transfer_syntax_uid=ExplicitVRLittleEndian, series_description=SC_DESCRIPTION,
            content_date=date, content_time=time, series_date=date, series_time=time,
            specific_character_set=_character_set(src),
        )

    sc = _build(source, src, "DICOM SC", build)
    sc.PatientOrientation = src.get("PatientOrientation", "")  # the film's, as it is (Type 2C): mmcli assumes none
    if "Laterality" not in sc:
        sc.Laterality = ""  # Type 2C (dciodvfy asks for it): a chest is not a paired body part
    sc.BurnedInAnnotation = "YES"
    sc.ConversionType = "WSD"  # workstation
    sc.DateOfSecondaryCapture, sc.TimeOfSecondaryCapture = DA(date), TM(time)  # highdicom's: the clock's
    sc.DerivationDescription = "Lung outline and findings of mmcli burned in; research use only"
    reference = pydicom.Dataset()
    reference.ReferencedSOPClassUID = src.SOPClassUID
    reference.ReferencedSOPInstanceUID = src.SOPInstanceUID
    sc.SourceImageSequence = [reference]
    return _save(sc, out, date, time)


def render_overlay(pixels: np.ndarray, sides: np.ndarray | None, lines: Sequence[str]) -> np.ndarray:
    """The picture of an SC: (h, w, 3) uint8 RGB.

    Args:
        pixels: (H, W) film in [0, 1]; shrunk to ``MAX_SIDE`` on its long side.
        sides: (H, W) lung label map or None; each lung is outlined in its colour.
        lines: text under the research notice, in a black band above the film.
    """
    film = np.asarray(pixels, dtype=np.float32)
    height, width = film.shape
    scale = min(1.0, MAX_SIDE / max(height, width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    step = max(1, int(np.sqrt(film.size / 1e6)))  # percentiles of about a million pixels
    lo, hi = np.percentile(film[::step, ::step], (0.5, 99.5))
    grey = np.clip((film - lo) / (hi - lo), 0, 1) if hi > lo else np.zeros_like(film)
    rgb = np.array(Image.fromarray((grey * 255 + 0.5).astype(np.uint8)).resize(size, Image.Resampling.BOX)
                   .convert("RGB"))
    if sides is not None:
        labels = np.asarray(Image.fromarray(np.asarray(sides, np.uint8)).resize(size, Image.Resampling.NEAREST))
        thick = max(1, round(max(size) / 600))
        for value, colour in _OUTLINES:
            lung = labels == value
            rgb[lung & ~ndi.binary_erosion(lung, iterations=thick, border_value=0)] = colour
    font_px = max(12, round(max(size) / 60))
    font = _font(font_px)
    texts = [(RESEARCH_NOTICE, _NOTICE_COLOUR), *((line, _TEXT_COLOUR) for line in lines)]
    pad, step_y = font_px // 2, round(font_px * 1.35)
    text_width = max(int(np.ceil(_text_length(text, font, font_px))) for text, _ in texts)
    canvas = Image.new("RGB", (max(size[0], text_width + 2 * pad), size[1] + len(texts) * step_y + 2 * pad))
    canvas.paste(Image.fromarray(rgb), ((canvas.width - size[0]) // 2, canvas.height - size[1]))
    draw = ImageDraw.Draw(canvas)
    for i, (text, colour) in enumerate(texts):
        _draw_text(draw, (pad, pad + i * step_y), text, font, font_px, colour)
    return np.asarray(canvas)


_DASH = "\u2014"  # Pillow's default font has no em dash: it is drawn as a line


def _text_length(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, font_px: int) -> float:
    parts = text.split(_DASH)
    return sum(font.getlength(part) for part in parts) + (len(parts) - 1) * font_px


def _draw_text(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str,
               font: ImageFont.FreeTypeFont | ImageFont.ImageFont, font_px: int, colour: tuple[int, int, int]) -> None:
    x: float = xy[0]
    y = xy[1]
    for i, part in enumerate(text.split(_DASH)):
        if i:  # an em dash: a font size wide, at the height of a hyphen
            top, bottom = font.getbbox("-")[1::2]
            mid = y + (top + bottom) / 2
            width = max(1, font_px // 14)
            draw.line([(x + font_px * 0.1, mid), (x + font_px * 0.9, mid)], fill=colour, width=width)
            x += font_px
        draw.text((x, y), part, fill=colour, font=font)
        x += font.getlength(part)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's own font at ``size`` px (its scalable default needs FreeType; else its small bitmap font)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()
