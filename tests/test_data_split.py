from pathlib import Path

import pytest

from batchcxr.training.data import LabelledImage, list_split, patient_id, patient_split


@pytest.mark.parametrize(
    "name, patient",
    [
        ("person123_bacteria_584.jpeg", "person123"),
        ("person1000_virus_1681.jpeg", "person1000"),
        ("IM-0123-0001.jpeg", "IM-0123"),
        ("IM-0011-0001-0002.jpeg", "IM-0011"),
        ("NORMAL2-IM-0123-0001.jpeg", "NORMAL2-IM-0123"),
        ("other.png", "other.png"),
    ],
)
def test_patient_id(name, patient):
    assert patient_id(name) == patient


def _items():
    items = []
    for p in range(40):
        for k in range(1 + p % 3):
            items.append(LabelledImage(Path(f"PNEUMONIA/person{p}_bacteria_{k}.jpeg"), 1))
    for p in range(20):
        items.append(LabelledImage(Path(f"NORMAL/IM-{p:04d}-0001.jpeg"), 0))
        items.append(LabelledImage(Path(f"NORMAL/IM-{p:04d}-0002.jpeg"), 0))
    return items


def test_split_keeps_patients_on_one_side_and_stratifies():
    train, val = patient_split(_items(), 0.2, seed=1)
    assert {i.patient for i in train}.isdisjoint({i.patient for i in val})
    assert len(train) + len(val) == len(_items())
    for label in (0, 1):
        share = sum(i.label == label for i in val) / sum(i.label == label for i in _items())
        assert 0.15 <= share <= 0.3


def test_split_is_seeded():
    assert patient_split(_items(), 0.2, 7) == patient_split(_items(), 0.2, 7)
    assert patient_split(_items(), 0.2, 7) != patient_split(_items(), 0.2, 8)


def test_list_split_names_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="NORMAL"):
        list_split(tmp_path)


def test_earliest_split_holds_out_the_lowest_numbers_of_each_series():
    items = _items() + [LabelledImage(Path(f"NORMAL/NORMAL2-IM-{p:04d}-0001.jpeg"), 0) for p in range(500, 520)]
    train, val = patient_split(items, 0.2, seed=1, rule="earliest")
    assert {i.patient for i in train}.isdisjoint({i.patient for i in val})
    val_patients = {i.patient for i in val}
    # each series gives its own lowest-numbered fifth: persons 0.., IM-0000.., NORMAL2-IM-0500..
    assert {"person0", "IM-0000", "NORMAL2-IM-0500"} <= val_patients
    assert not {"person39", "IM-0019", "NORMAL2-IM-0519"} & val_patients
    for series in ("person", "IM-", "NORMAL2-IM-"):
        of_series = [i for i in items if i.patient.rstrip("0123456789") == series]
        share = sum(i in val for i in of_series) / len(of_series)
        assert 0.2 <= share <= 0.3, series
    assert patient_split(items, 0.2, seed=1, rule="earliest") == patient_split(items, 0.2, seed=9, rule="earliest")
