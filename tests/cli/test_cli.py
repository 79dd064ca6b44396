"""The `kvevents` command: the demo (the README's main job) and tap."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from kvevents import vllm
from kvevents_apps.cli import sniff_dialect

KVEVENTS = [sys.executable, "-m", "kvevents"]


def test_demo_repairs_a_gap_and_a_restart_and_loses_nothing():
    result = subprocess.run(
        [*KVEVENTS, "demo", "--batches", "4000", "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "lost = 0" in result.stdout
    assert "resets             1" in result.stdout
    assert "batches delivered  4000" in result.stdout


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


def test_demo_is_right_for_tiny_runs_and_a_clean_join_says_nothing_spurious():
    for batches in ("1", "10"):
        result = subprocess.run(
            [*KVEVENTS, "demo", "--batches", batches], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "lost = 0" in result.stdout and f"batches delivered  {batches}," in result.stdout
        notices = [line for line in result.stderr.splitlines() if "notice:" in line]
        assert [n for n in notices if "reset" not in n] == [], notices
