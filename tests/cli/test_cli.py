"""The `kvevents` command: the demo (the README's main job) and tap."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from kvevents import vllm
from kvevents_apps.cli import build_parser, sniff_dialect
from tests.support import ROOT, wait_until

KVEVENTS = [sys.executable, "-m", "kvevents"]


@pytest.mark.parametrize("run", range(3))
def test_every_default_demo_run_shows_a_live_gap_repaired_and_a_restart(run: int):
    """The README's main job, as written: every run shows what it promises (the stall's
    burst overflows small pipes and kernel buffers whatever the machine's load)."""
    result = subprocess.run(
        [*KVEVENTS, "demo", "--quiet"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    gaps = re.search(
        r"^  live gaps +(\d+), (\d+) repaired by replay \((\d+) batches replayed\); "
        r"the subscriber stalled at seq \d+",
        out,
        re.MULTILINE,
    )
    assert gaps, out
    assert int(gaps[1]) >= 1 and int(gaps[2]) == int(gaps[1]) and int(gaps[3]) >= 1
    assert re.search(r"^  resets +1 \(publisher restart detected\)$", out, re.MULTILINE), out
    assert re.search(r"^  batches delivered +20000, in order", out, re.MULTILINE), out
    assert re.search(r"^  history lost +0$", out, re.MULTILINE), out
    assert result.stdout.rstrip().endswith("lost = 0")


def test_tap_prints_one_json_line_per_event(publishers):
    publisher = vllm.ZmqEventPublisher(
        0, endpoint="tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0"
    )
    publishers.append(publisher)
    for n in range(3):
        publisher.publish(
            vllm.KVEventBatch(ts=1.0, events=[vllm.BlockRemoved(block_hashes=[n], medium=None)])
        )
    time.sleep(0.2)
    result = subprocess.run(
        [
            *KVEVENTS,
            "tap",
            publisher.connect_endpoint,
            "--replay",
            publisher.connect_replay_endpoint,
            "--from-start",
            "--count",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(line["seq"], line["dialect"], line["dp_rank"]) for line in lines] == [
        (0, "vllm", 0),
        (1, "vllm", 0),
        (2, "vllm", 0),
    ]
    assert lines[0]["event"] == {"type": "BlockRemoved", "block_hashes": [0]}


def test_bad_endpoint_and_nothing_listening_are_one_line_errors():
    bad = subprocess.run(
        [*KVEVENTS, "tap", "udp://nowhere"], capture_output=True, text=True, timeout=30
    )
    assert (
        bad.returncode == 2 and bad.stderr.count("\n") == 1 and "unsupported endpoint" in bad.stderr
    )
    quiet = subprocess.run(
        [*KVEVENTS, "tap", "tcp://127.0.0.1:1", "--timeout", "0.5"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert quiet.returncode == 1 and "nothing received" in quiet.stderr


def test_sniff_dialect():
    prefix = "93cb3ff800000000000091"
    assert sniff_dialect(bytes.fromhex(prefix + "92ac426c6f636b52656d6f76656492010200")) == "legacy"
    sglang = prefix + "82a474797065ac426c6f636b52656d6f766564ac626c6f636b5f68617368657392010200"
    vllm_removed = (
        prefix
        + "83a474797065ac426c6f636b52656d6f766564ac626c6f636b5f686173686573920102a66d656469756dc000"
    )
    assert sniff_dialect(bytes.fromhex(sglang)) == "sglang"
    assert sniff_dialect(bytes.fromhex(vllm_removed)) == "vllm"
    assert sniff_dialect(b"garbage") == "unknown"


def _publish(publisher, count: int) -> None:
    for n in range(count):
        publisher.publish(
            vllm.KVEventBatch(ts=1.0, events=[vllm.BlockRemoved(block_hashes=[n], medium=None)])
        )


def test_tap_count_is_exact_and_a_closed_pipe_ends_it_quietly(publishers):
    publisher = vllm.ZmqEventPublisher(
        0, endpoint="tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0"
    )
    publishers.append(publisher)
    _publish(publisher, 50)
    time.sleep(0.2)
    tap = [
        *KVEVENTS,
        "tap",
        publisher.connect_endpoint,
        "--replay",
        publisher.connect_replay_endpoint,
        "--from-start",
    ]
    exact = subprocess.run([*tap, "--count", "7"], capture_output=True, text=True, timeout=30)
    assert exact.returncode == 0, exact.stderr
    assert [json.loads(line)["seq"] for line in exact.stdout.splitlines()] == list(range(7))
    # `| head -1`: the reader closes the pipe after one line.
    with subprocess.Popen(
        [*tap, "--count", "50"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as proc:
        assert proc.stdout is not None and proc.stdout.readline()
        proc.stdout.close()
        assert proc.wait(30) == 0
        assert proc.stderr is not None and b"Traceback" not in proc.stderr.read()


def test_tap_explains_a_bind_address_and_warns_when_silent(publishers):
    wildcard = subprocess.run(
        [*KVEVENTS, "tap", "tcp://*:5557"], capture_output=True, text=True, timeout=30
    )
    assert wildcard.returncode == 2 and "tcp://127.0.0.1:5557" in wildcard.stderr
    publisher = vllm.ZmqEventPublisher(0, endpoint="tcp://127.0.0.1:0")
    publishers.append(publisher)
    silent = subprocess.run(
        [*KVEVENTS, "tap", publisher.connect_endpoint, "--silent", "0.5", "--timeout", "1.5"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert silent.returncode == 1 and "stale source=0" in silent.stderr
    stale = next(line for line in silent.stderr.splitlines() if "stale" in line)
    assert publisher.connect_endpoint in stale, "the notice names the endpoint"


def test_demo_is_right_for_tiny_runs_and_a_clean_join_says_nothing_spurious():
    for batches in ("1", "10"):
        result = subprocess.run(
            [*KVEVENTS, "demo", "--batches", batches], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "lost = 0" in result.stdout and f"batches delivered  {batches}," in result.stdout
        notices = [line for line in result.stderr.splitlines() if "notice:" in line]
        expected = ("reset", "holding")  # the demo restarts its publisher
        assert [n for n in notices if not any(kind in n for kind in expected)] == [], notices


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    return result.stderr


BAD_VALUES = [
    (["simulate", "--workers", "0"], "--workers: must be at least 1"),
    (["simulate", "--block-size", "0"], "--block-size: must be at least 1"),
    (["simulate", "--capacity", "-3"], "--capacity: must be at least 1"),
    (["simulate", "--limit", "0"], "--limit: must be at least 1"),
    (["simulate", "--jobs", "0"], "--jobs: must be at least 1"),
    (["simulate", "--policy", "kv", "--policy", "kv"], "--policy kv given more than once"),
    (["simulate", "--check-every", "x"], "'x' is not a whole number"),
    (["simulate", "--trace", "no-such-trace.jsonl"], "no trace file"),
    (["simulate", "--png", "no-such-dir/chart.png"], "no directory"),
    (["simulate", "--offline", "--faults"], "no sockets to fault"),
    (["simulate", "--compare-dynamo"], "give --trace"),
    (["simulate", "--max-num-batched-tokens", "0"], "must be at least 1"),
    (["simulate", "--overlap-weight", "-1"], "--overlap-weight: must be at least 0"),
    (["tap", "tcp://127.0.0.1:1", "--from-start"], "give --replay too"),
    (["tap", "tcp://127.0.0.1:1", "--count", "-1"], "--count: must be at least 0"),
    (["tap", "tcp://127.0.0.1:1", "--silent", "inf"], "not a finite number"),
    (["tap", "tcp://127.0.0.1:1", "--metrics-port", "65536"], "must be at most 65535"),
    (["demo", "--batches", "0"], "--batches: must be at least 1"),
    (["demo", "--dialect", "trtllm"], "invalid choice: 'trtllm'"),
    (["index", "--port", "-1"], "--port: must be at least 0"),
    (["index", "--block-size", "0"], "--block-size: must be at least 1"),
    (["index", "--workers", "1=bad"], "kvevents index"),
    (["no-such-command"], "invalid choice"),
    (["keys", "/proc/no-such-dir/keys", "node"], "kvevents keys"),
    ([], "required: COMMAND"),
]


@pytest.mark.parametrize(("argv", "said"), BAD_VALUES, ids=[" ".join(a) for a, _ in BAD_VALUES])
def test_a_bad_value_is_one_line_and_exit_status_2(argv: list[str], said: str, tmp_path: Path):
    result = subprocess.run(
        [*KVEVENTS, *argv], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert said in _one_line_error(result)


def test_a_trace_that_is_not_mooncake_jsonl_names_its_line(tmp_path: Path):
    good = {"timestamp": 0, "input_length": 600, "output_length": 4, "hash_ids": [1, 2]}
    for text, said in (
        (json.dumps(good) + "\nnot json\n", ":2: not a Mooncake trace row"),
        (json.dumps({**good, "hash_ids": "x"}) + "\n", ":1: not a Mooncake trace row"),
        (json.dumps({"timestamp": 0}) + "\n", "no 'hash_ids'"),
        ("\n\n", "holds no requests"),
    ):
        trace = tmp_path / "trace.jsonl"
        trace.write_text(text)
        result = subprocess.run(
            [*KVEVENTS, "simulate", "--trace", str(trace)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert said in _one_line_error(result)


def test_version_and_help_explain_every_command_and_option():
    version = subprocess.run([*KVEVENTS, "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and re.fullmatch(r"kvevents \d+\.\d+\.\d+\S*\n", version.stdout)
    top = subprocess.run([*KVEVENTS, "--help"], capture_output=True, text=True, timeout=60)
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) == {"tap", "demo", "index", "bridge", "simulate", "keys"}
    for name, sub in commands.choices.items():
        assert re.search(rf"^    {name} +\S", top.stdout, re.MULTILINE), f"{name} not explained"
        assert sub.description, f"kvevents {name} --help has no description"
        for action in sub._actions:
            assert action.help, f"kvevents {name} {action.option_strings} has no help"


def test_simulate_with_engines_smaller_than_every_request_says_so(tmp_path: Path):
    """Every request is larger than a whole 4-block cache: served uncached, which the output
    says, and the table still prints (it raised TypeError)."""
    argv = ["simulate", "--capacity", "4", "--limit", "20", "--workers", "2", "--policy", "kv"]
    table = subprocess.run(
        [*KVEVENTS, *argv], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert table.returncode == 0, table.stderr
    assert re.search(r"^\| kv \| 0\.000 \|", table.stdout, re.MULTILINE), table.stdout
    assert "20 of 20 requests were larger than an engine's whole cache" in table.stderr
    as_json = subprocess.run(
        [*KVEVENTS, *argv, "--json"], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    (result,) = json.loads(as_json.stdout)
    assert result["requests"] == 20 and result["uncached_requests"] == 20
    assert result["requests_per_s"] > 0 and result["simulated_s"] > 0
    assert list(tmp_path.iterdir()) == [], "simulate wrote a file nobody asked for"


def test_simulate_writes_a_png_only_where_asked(tmp_path: Path):
    pytest.importorskip("matplotlib", reason="the plot extra")
    chart = tmp_path / "out" / "chart.png"
    chart.parent.mkdir()
    argv = [
        "simulate",
        "--limit",
        "30",
        "--workers",
        "2",
        "--policy",
        "round_robin",
        "--png",
        str(chart),
    ]
    result = subprocess.run(
        [*KVEVENTS, *argv], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert chart.read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_index_reports_a_busy_port_before_claiming_to_serve():
    pytest.importorskip("uvicorn", reason="the index extra")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = subprocess.run(
            [*KVEVENTS, "index", "--port", str(port)], capture_output=True, text=True, timeout=60
        )
    assert f"cannot listen on 127.0.0.1:{port}" in _one_line_error(result)
    assert "serving on" not in result.stderr


def test_tap_serves_the_subscribers_metrics(publishers):
    pytest.importorskip("prometheus_client", reason="the metrics extra")
    publisher = vllm.ZmqEventPublisher(
        0, endpoint="tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0"
    )
    publishers.append(publisher)
    _publish(publisher, 5)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [
        *KVEVENTS,
        "tap",
        publisher.connect_endpoint,
        "--replay",
        publisher.connect_replay_endpoint,
        "--from-start",
        "--metrics-port",
        str(port),
    ]
    with subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    ) as tap:
        try:

            def scraped() -> str:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                        return r.read().decode()
                except OSError:
                    return ""

            assert wait_until(lambda: "kvevents_subscriber_delivered_total 5.0" in scraped(), 20), (
                scraped()
            )
            assert "# TYPE kvevents_subscriber_source_next_seq gauge" in scraped()
        finally:
            tap.terminate()
            tap.wait(10)


README_COMMAND = re.compile(
    r"`(kvevents (?:tap|demo|index|simulate)[^`]*)`|^(?:pip install[^\n]*&& )?(kvevents (?:tap|demo|index|simulate)[^\n#]*)",
    re.MULTILINE,
)


def test_every_kvevents_command_in_the_readme_parses():
    """The README's commands use options that exist, with values they accept (run for real:
    the demo above, the wheel session's smoke run, the index and simulate tests)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    found = [(a or b).strip() for a, b in README_COMMAND.findall(text)]
    found = [c for c in found if c != "kvevents tap"]  # the bare name of a command, in prose
    assert len(found) >= 5, found
    parser = build_parser()
    for command in found:
        argv = shlex.split(command.replace("HOST", "127.0.0.1").replace("...", ""))[1:]
        try:
            parser.parse_args(argv)
        except SystemExit as exc:
            raise AssertionError(f"README: {command!r} does not parse") from exc


def test_keys_writes_a_pair_a_publisher_and_a_subscriber_can_load(tmp_path: Path):
    result = subprocess.run(
        [*KVEVENTS, "keys", str(tmp_path / "k"), "engine"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    from kvevents import CurveClient

    client = CurveClient.from_files(
        tmp_path / "k" / "engine.key_secret", tmp_path / "k" / "engine.key"
    )
    assert client.public_key == client.server_key  # the pair's own public half, read back
    assert (tmp_path / "k" / "engine.key_secret").stat().st_mode & 0o077 == 0
