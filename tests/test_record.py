"""The result record: schema checks and atomic writes."""
import json

import pytest

from ssdbench import record as rec


def _record(status="ok", **extra):
    r = {k: None for k in rec.REQUIRED_KEYS}
    r.update(schema=rec.SCHEMA_VERSION, status=status, metrics={"val/acc": 0.5}, params={"total": 1})
    r.update(extra)
    return r


def test_roundtrip(tmp_path):
    path = rec.write_record(tmp_path, _record())
    assert path == tmp_path / "record.json"
    assert rec.read_record(path)["metrics"] == {"val/acc": 0.5}
    assert rec.find_records(tmp_path) == [path]


@pytest.mark.parametrize("bad", [{"status": "done"}, {"status": None}])
def test_bad_status_rejected(tmp_path, bad):
    with pytest.raises(ValueError, match="status"):
        rec.write_record(tmp_path, _record(**bad))


def test_missing_keys_rejected(tmp_path):
    r = _record()
    del r["metrics"]
    with pytest.raises(ValueError, match="metrics"):
        rec.write_record(tmp_path, r)


def test_failed_write_keeps_previous_record_and_leaves_no_temp(tmp_path):
    rec.write_record(tmp_path, _record(status="running"))
    with pytest.raises(TypeError):
        rec.write_record(tmp_path, _record(metrics={"x": object()}))  # not serialisable mid-write
    assert json.loads((tmp_path / "record.json").read_text())["status"] == "running"
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_environment_fields():
    versions = rec.package_versions()
    assert versions["torch"] and versions["python"]
    hw = rec.hardware()
    assert hw["cpu_count"] and "gpu" in hw
