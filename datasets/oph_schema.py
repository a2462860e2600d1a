"""FairFedMed-Oph / Harvard ophthalmology npz family: attribute codes, names and CSV text.

One table shared by the loader (`fairfedmed_oph.py`) and the synthetic twin (`synthetic.py`)
so the two can never disagree. Source: specs/fairfedmed.md and specs/datasets.md.
"""

from __future__ import annotations

from dataclasses import dataclass

UNKNOWN = -1
UNKNOWN_TEXT = "unknown"

LABEL = "glaucoma"
LABEL_TEXT = {"no": 0, "yes": 1}

MODALITIES = ("slo_fundus", "oct_bscans")
# npz keys holding a volume (slices, depth, width); the synthetic twin adds its ONH cube.
VOLUME_KEYS = ("oct_bscans", "oct_onh_bscans")
NUM_SITES = 3
SPLITS = ("train", "test")
# Site CSVs exist for these attributes; `maritalstatus` is recorded but has no site split.
SITE_ATTRIBUTES = ("race", "language", "ethnicity", "gender")


@dataclass(frozen=True)
class Attribute:
    """One sensitive attribute: integer codes, display names and the CSV's text values."""

    name: str
    names: tuple[str, ...]  # display name of code 0, 1, ...
    csv_text: tuple[str, ...]  # CSV text of code 0, 1, ...
    npz_keys: tuple[str, ...]  # key families that may carry it (first found wins)

    def group_names(self) -> dict[int, str]:
        return dict(enumerate(self.names))


ATTRIBUTES: dict[str, Attribute] = {
    a.name: a
    for a in (
        Attribute("race", ("Asian", "Black", "White"), ("asian", "black", "white"), ("race",)),
        # Female=0, Male=1 is the npz family's documented coding (the default).
        Attribute("gender", ("Female", "Male"), ("female", "male"), ("gender", "male")),
        Attribute(
            "ethnicity",
            ("Non-hispanic", "Hispanic"),
            ("non-hispanic", "hispanic"),
            ("ethnicity", "hispanic"),
        ),
        Attribute(
            "language",
            ("English", "Spanish", "Others"),
            ("english", "spanish", "others"),
            ("language",),
        ),
        Attribute(
            "maritalstatus",
            ("Married/partnered", "Single", "Divorced", "Widowed", "Legally separated"),
            ("married or partnered", "single", "divorced", "widowed", "legally separated"),
            ("maritalstatus",),
        ),
    )
}

# Race is sometimes stored as a string in the npz family.
RACE_STRINGS = {
    "asian": 0,
    "black or african american": 1,
    "black": 1,
    "white or caucasian": 2,
    "white": 2,
}

CSV_COLUMNS = ("filename", "age", *ATTRIBUTES, LABEL)


def code_from_text(attribute: str, text: object) -> int | None:
    """Integer code of a CSV text value; None when the text is not a valid value."""
    value = str(text).strip().lower()
    if value in (UNKNOWN_TEXT, "", "nan", "-1"):
        return UNKNOWN
    table = ATTRIBUTES[attribute].csv_text
    if value in table:
        return table.index(value)
    if attribute == "race" and value in RACE_STRINGS:
        return RACE_STRINGS[value]
    return None


def text_from_code(attribute: str, code: int) -> str:
    if code == UNKNOWN:
        return UNKNOWN_TEXT
    return ATTRIBUTES[attribute].csv_text[code]
