"""The demo's outcome as a person reads it (`--json` prints the same dict)."""

from __future__ import annotations

from typing import Any

from qvaudio.core.policy import Access
from qvaudio.demo.measure import MAX_FREQ_ERROR_PERCENT, MIN_NONSILENT_PERCENT


def _mark(passed: bool) -> str:
    return "ok" if passed else "FAILED"


def _decision_text(decision: object, rule: object) -> str:
    """The decision once: dom0's rule text already starts with it ("playback allow by ...")."""
    said = f"playback {decision}"
    if not rule:
        return said
    return str(rule) if str(rule).startswith(said) else f"{said} ({rule})"


def print_result(result: dict[str, Any]) -> None:
    verdict = "the tone arrived" if result["tone_arrived"] else "THE TONE DID NOT ARRIVE INTACT"
    heard = bool(result["measured_hz"])
    freq_ok = heard and result["frequency_error_percent"] < MAX_FREQ_ERROR_PERCENT
    coverage = result["nonsilent_fraction"] * 100
    onset = result["onset_delay_ms"]
    latency = result["reported_latency_ms"]
    print(f"qvaudio demo: {verdict}")
    if result.get("error"):
        print(f"  why              {result['error']}")
    print(f"  VM               {result['vm']} ({result['format'] or 'no format agreed'}) -> "
          f"{result['played_to']}")  # fmt: skip
    print(f"  policy           {_decision_text(result['policy_decision'], result['policy_rule'])}")
    print(f"  policy files     {result['policy_dir']} ({result['policy_source']})")
    played = "would play" if result["policy_decision"] == Access.DENY else "played"
    print(f"  recorded         {result['recorded_from']} (monitor of the sink dom0 {played} to)")
    measured = (
        f"{result['measured_hz']} Hz, off by {result['frequency_error_percent']} %"
        if heard
        else "no tone"
    )
    print(
        f"  frequency        {measured} (pass: within {MAX_FREQ_ERROR_PERCENT:g} % of "
        f"{result['tone_hz']:g} Hz)  {_mark(freq_ok)}"
    )
    print(
        f"  non-silent       {coverage:.2f} % of 10 ms windows "
        f"(pass: at least {MIN_NONSILENT_PERCENT:g} %)  "
        f"{_mark(coverage >= MIN_NONSILENT_PERCENT)}"
    )
    snr = f"{result['snr_db']} dB" if heard else "-"
    print(f"  signal-to-noise  {snr}")
    print(
        f"  onset delay      {'-' if onset is None else f'{onset} ms'} "
        "(VM player -> dom0 sink, incl. both servers' buffers)"
    )
    print(
        f"  latency (status) {f'{latency} ms' if latency else '-'} (the VM's audio dom0 holds: "
        "its queue + the host stream's buffer, as `qvaudio status` shows)"
    )
