"""Quality tables: one row per (model, pattern, scorer)."""

from world.quality import summary_rows


def _record(model, pattern, h, mse):
    return {
        "model": model,
        "pattern": pattern,
        "scorer": None,
        "horizon_frames": h,
        "mse": mse,
        "reappear_mse": None,
        "peak_kv_bytes": 2**20,
        "recall_25": None,
    }


def test_summary_rows_keep_models_apart():
    records = [
        _record(m, "persistent_local", h, mse)
        for m, mse in (("dense", 0.1), ("sparse_ft", 0.05))
        for h in (18, 72)
    ]
    rows = summary_rows(records)
    assert [(r["model"], r["mse@18"], r["mse@72"]) for r in rows] == [
        ("dense", 0.1, 0.1),
        ("sparse_ft", 0.05, 0.05),
    ]
    assert list(rows[0])[:3] == ["model", "pattern", "scorer"]
    plain = summary_rows([{k: v for k, v in r.items() if k != "model"} for r in records])
    assert len(plain) == 1 and "model" not in plain[0]
