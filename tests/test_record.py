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


def test_keys_added_later_compare_equal_at_their_old_value():
    """A record written before a config key existed matches a config holding the value that
    key's absence meant (so an old finished sweep is skipped on rerun), and only that value."""
    from ssdbench.record import config_differences

    old = {"seed": 0, "trainer": {"max_steps": 5}, "optim": {"lr": 1.0}}
    new = {"seed": 0, "trainer": {"max_steps": 5, "cuda_graph": "auto"}, "budget": None, "paper": None,
           "optim": {"lr": 1.0, "schedule": "cosine", "min_lr_ratio": None}}
    assert config_differences(old, new) == []
    new["optim"]["schedule"] = "linear"
    new["trainer"]["cuda_graph"] = False
    assert config_differences(old, new) == ["optim.schedule", "trainer.cuda_graph"]
    # the other way round (the record has the key, the config does not) is a real difference
    assert set(config_differences(new, old)) == {"budget", "paper", "optim.min_lr_ratio", "optim.schedule",
                                                 "trainer.cuda_graph"}
