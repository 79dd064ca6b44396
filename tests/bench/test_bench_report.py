"""The benchmark's verdict logic on synthetic figures: a target is met exactly when every
comparison under it is, an unmet one says what bounds it, and the outputs are complete.
(The measurements themselves run only in `nox -s bench`, never in the test suite.)"""

from __future__ import annotations

import json

import pytest

from bench import report
from bench.impls import PAIRS
from bench.shapes import SHAPES
from bench.stats import Figure

LABELS = {
    "kvevents-vllm": "kvevents.vllm",
    "vllm": "vLLM 0.33.0",
    "kvevents-sglang": "kvevents.sglang",
    "sglang": "SGLang 0.5.23",
}


def fig(*samples: float, unit: str = "x") -> Figure:
    return Figure(unit, list(samples))


def live_row(rate: float, thread_cpu: float | None, publish: float) -> dict:
    return {
        "figures": {
            "batches_per_s": fig(rate, rate * 0.9, rate * 1.1),
            "events_per_s": fig(rate),
            "publish_wall_us": fig(publish),
            "publish_cpu_us": fig(publish),
            "thread_cpu_us": fig(*([thread_cpu] if thread_cpu is not None else [])),
        },
        "dropped": [0, 0, 0],
        "in_order": True,
    }


def synthetic(speedup: float) -> dict:
    """kvevents `speedup` times better than the references on every figure."""
    live, delivered, replay, decode = {}, {}, {}, {}
    for shape in SHAPES:
        for transport in ("tcp", "ipc"):
            for raw in ("raw", "raw-unwrapped"):
                live[raw, shape, transport] = live_row(120_000 * speedup, None, 2.0)
            for ours, ref in PAIRS:
                live[ours, shape, transport] = live_row(100_000 * speedup, 10 / speedup, 0.1)
                live[ref, shape, transport] = live_row(100_000, 10, 0.8)
            delivered["kvevents", shape, transport] = {
                "figures": {"batches_per_s": fig(150_000 * speedup)},
                "dropped": [0],
                "in_order": True,
            }
            for consumer, rate in (
                ("vllm_example", 150_000),
                ("recv_floor", 1_000_000 * speedup),
                ("strict_floor", 300_000 * speedup),
            ):
                delivered[consumer, shape, transport] = {
                    "figures": {"batches_per_s": fig(rate)},
                    "dropped": [0],
                    "in_order": True,
                }
        for _, ref in PAIRS:
            decode[ref, shape] = {"tolerant_us": fig(1.2), "typed_us": fig(1.0)}
    for size in (1000, 10_000):
        for ours, ref in PAIRS:
            for key, factor in ((ours, 1 / speedup), (ref, 1.0)):
                for case, latency in (
                    ("from 0", 20.0 * size),
                    ("last 5", 1000.0),
                    ("past end", 500.0),
                ):
                    replay[key, size, case] = {
                        "figures": {
                            "latency_us": fig(latency * factor),
                            "per_entry_us": fig(20.0 * factor),
                        },
                        "entries": [size],
                        "end_missing": 0,
                    }
    return {
        "machine": {
            "cpus": 2,
            "python": "3.11",
            "pyzmq": "27",
            "libzmq": "4.3",
            "msgspec": "0.19",
            "date": "today",
        },
        "settings": {"reps": 3, "rss_batches": 1_000_000},
        "impls": LABELS,
        "seconds": 1.0,
        "live": live,
        "delivered": delivered,
        "replay": replay,
        "codec": {"decode": decode, "encode": {shape: fig(0.4) for shape in SHAPES}},
        "rss": {
            key: {
                "samples_kib": [(100_000, 40_000), (1_000_000, 40_100)],
                "peak_kib": 41_000,
                "growth_kib": 100,
                "seconds": 2.0,
                "dropped": 0,
            }
            for key in LABELS
        },
    }


def test_every_target_is_met_when_kvevents_is_far_ahead():
    verdict = report.targets(synthetic(speedup=20))
    assert {t["id"]: t["met"] for t in verdict} == dict.fromkeys(
        [
            "thread_cpu",
            "e2e_vs_reference",
            "e2e_vs_raw",
            "publish_call",
            "replay_tail",
            "replay_full",
            "decode",
            "subscriber",
            "filed_rate",
            "rss",
        ],
        True,
    )
    assert all(t["bound"] is None for t in verdict)


@pytest.mark.parametrize(
    "target", ["thread_cpu", "e2e_vs_reference", "replay_tail", "replay_full", "subscriber"]
)
def test_a_ratio_target_is_not_met_when_kvevents_is_only_twice_as_fast(target):
    verdict = {t["id"]: t for t in report.targets(synthetic(speedup=2))}
    assert verdict[target]["met"] is False
    assert verdict[target]["bound"], "an unmet target must say what bounds it"
    assert all(row["value"] == pytest.approx(2) for row in verdict[target]["rows"])


def test_the_filed_rate_is_judged_on_the_advantage_over_the_example_consumer():
    """Issue 12's rate target carries the filed run to this one through the example consumer:
    at 2x its rate kvevents is below every filed advantage (2.30x, 1.15x, 2.78x, ...) but (b)'s,
    and the unmet target quotes the strictly framed floor on the same scale."""
    verdict = {t["id"]: t for t in report.targets(synthetic(speedup=2))}
    filed = verdict["filed_rate"]
    assert filed["met"] is False
    values = {row["what"]: row["value"] for row in filed["rows"]}
    assert values["(a) tcp"] == pytest.approx(2 / 2.30)
    assert values["(b) tcp"] == pytest.approx(2 / 1.15)
    assert [row["what"] for row in filed["rows"] if row["ok"]] == ["(b) tcp", "(b) ipc"]
    assert f"(a) tcp {4 / 2.30:.3g}" in filed["bound"]  # the floor: 4x the example consumer


def test_one_failing_comparison_fails_its_target():
    results = synthetic(speedup=20)
    results["codec"]["decode"]["sglang", "c"]["tolerant_us"] = fig(1.6)
    verdict = {t["id"]: t for t in report.targets(results)}
    assert verdict["decode"]["met"] is False
    failing = [row["what"] for row in verdict["decode"]["rows"] if not row["ok"]]
    assert failing == ["(c) SGLang 0.5.23 bytes"]


def test_a_missing_figure_is_never_counted_as_met():
    results = synthetic(speedup=20)
    results["live"]["kvevents-vllm", "a", "tcp"]["figures"]["thread_cpu_us"] = Figure("µs")
    verdict = {t["id"]: t for t in report.targets(results)}
    assert verdict["thread_cpu"]["met"] is False


def test_markdown_json_and_chart_carry_every_target(tmp_path):
    results = synthetic(speedup=2)
    verdict = report.targets(results)
    text = report.markdown(results, verdict, "nox -s bench")
    for t in verdict:
        assert t["goal"] in text
    assert text.count("**not met**") == sum(not t["met"] for t in verdict)
    data = json.loads(report.to_json(results, verdict))
    assert data["live"]["kvevents-vllm / a / tcp"]["figures"]["batches_per_s"][
        "median"
    ] == pytest.approx(200_000)
    assert [t["id"] for t in data["targets"]] == [t["id"] for t in verdict]
    pytest.importorskip("matplotlib")
    report.chart(verdict, tmp_path / "ratios.png")
    assert (tmp_path / "ratios.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _as_json(speedup: float) -> dict:
    results = synthetic(speedup)
    return json.loads(report.to_json(results, report.targets(results)))


def test_the_baseline_table_flags_a_row_only_when_the_advantage_falls():
    from bench import baseline

    steady, regressed = baseline.compare(_as_json(8.0), _as_json(8.0))
    assert regressed == [] and "end to end batches/s, (a) tcp, kvevents-vllm" in steady
    _, regressed = baseline.compare(_as_json(8.0), _as_json(6.0))
    assert regressed and all(
        "kvevents" in row or "subscriber" in row or "replay" in row for row in regressed
    )
    _, improved = baseline.compare(_as_json(6.0), _as_json(8.0))
    assert improved == []


def test_a_partial_run_reports_and_judges_only_its_sections():
    """`python -m bench --only ...`: a section left out is neither rendered nor judged (it
    used to be a KeyError: every part of the report assumed a whole run)."""
    whole = synthetic(speedup=2)
    partial = {key: whole[key] for key in ("machine", "settings", "impls", "seconds", "replay")}
    verdict = report.targets(partial)
    assert [t["id"] for t in verdict] == ["replay_tail", "replay_full"]
    text = report.markdown(partial, verdict, "nox -s bench -- --only replay")
    assert "## Replay" in text and "## End to end" not in text and "## Peak RSS" not in text


def test_only_names_known_sections():
    from bench.__main__ import _sections

    assert _sections("index, snapshot") == {"index", "snapshot"}
    with pytest.raises(Exception, match="unknown section nope: choose from codec, live"):
        _sections("index,nope")
