"""The per-destination circuit breaker: thresholds, one probe, doubling, recovery."""

from __future__ import annotations

from worker.delivery.circuit import Circuit, CircuitPolicy, CircuitState, Verdict


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _circuit(
    clock: Clock, changes: list[tuple[str, CircuitState]] | None = None, threshold: int = 3
) -> Circuit:
    policy = CircuitPolicy(failure_threshold=threshold, open_s=10.0, max_open_s=35.0)
    record = None if changes is None else (lambda d, s: changes.append((d, s)))
    return Circuit("shop", policy, clock=clock, on_change=record)


def test_opens_after_threshold_consecutive_failures_only() -> None:
    clock = Clock()
    circuit = _circuit(clock)
    circuit.failed()
    circuit.failed()
    circuit.succeeded()  # resets the count
    circuit.failed()
    circuit.failed()
    assert circuit.allow() is Verdict.SEND
    circuit.failed()
    assert circuit.state is CircuitState.OPEN
    assert circuit.allow() is Verdict.PARK
    assert circuit.retry_in() == 10.0


def test_one_probe_after_open_s_then_close_on_success() -> None:
    clock = Clock()
    changes: list[tuple[str, CircuitState]] = []
    circuit = _circuit(clock, changes, threshold=1)
    circuit.failed()
    clock.now += 9.9
    assert circuit.allow() is Verdict.PARK
    clock.now += 0.1
    assert circuit.allow() is Verdict.PROBE
    assert circuit.state is CircuitState.HALF_OPEN
    assert circuit.allow() is Verdict.PARK  # only one probe at a time
    circuit.succeeded()
    assert circuit.allow() is Verdict.SEND
    assert changes == [
        ("shop", CircuitState.OPEN),
        ("shop", CircuitState.HALF_OPEN),
        ("shop", CircuitState.CLOSED),
    ]


def test_failed_probe_doubles_the_pause_up_to_max_open_s() -> None:
    clock = Clock()
    circuit = _circuit(clock, threshold=1)
    circuit.failed()
    pauses = []
    for _ in range(4):
        clock.now += circuit.retry_in()
        assert circuit.allow() is Verdict.PROBE
        circuit.failed()
        pauses.append(circuit.retry_in())
    assert pauses == [20.0, 35.0, 35.0, 35.0]
    clock.now += 35.0
    assert circuit.allow() is Verdict.PROBE
    circuit.succeeded()
    circuit.failed()  # closed again: back to open_s
    assert circuit.retry_in() == 10.0


def test_a_probe_that_never_reports_is_replaced_after_one_open_period() -> None:
    clock = Clock()
    circuit = _circuit(clock, threshold=1)
    circuit.failed()
    clock.now += 10.0
    assert circuit.allow() is Verdict.PROBE
    clock.now += 9.0
    assert circuit.allow() is Verdict.PARK
    assert circuit.retry_in() == 1.0
    clock.now += 1.0
    assert circuit.allow() is Verdict.PROBE


def test_failures_of_requests_started_before_opening_do_not_extend_it() -> None:
    clock = Clock()
    circuit = _circuit(clock, threshold=1)
    circuit.failed()
    clock.now += 5.0
    circuit.failed()
    assert circuit.retry_in() == 5.0
