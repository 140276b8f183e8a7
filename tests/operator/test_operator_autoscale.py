"""The autoscaler's decision function (chatstream_operator.autoscale.decide),
pure: windows, delays, pods still starting, min/max, zero.

`run` plays a load over time at one sample a second, as the operator takes
them, applies every decision to the desired count (as the API would) and
returns the decisions: the tests read them as a user reads the Events."""

from __future__ import annotations

import pytest

from builder_helpers import make_resource
from chatstream_operator import autoscale
from chatstream_operator.autoscale import Policy, Sample, decide

POLICY = Policy(min_replicas=1, max_replicas=4, target=4, window=10, scale_down_delay=60)


def run(policy: Policy, load, seconds: int, current: int = 1, held=lambda t: 0, samples=None, start: int = 0):
    """Sample load(t) each second from `start` to `start + seconds`; returns
    (decisions with their time, the desired count each second, the samples)."""
    samples = list(samples or [])
    decisions, timeline = [], []
    for t in range(start, start + seconds):
        samples.append(Sample(float(t), float(load(t)), held(t)))
        d = decide(policy, samples, current, float(t))
        if d.changed:
            decisions.append((t, d))
            current = d.replicas
        else:
            assert d.replicas == current
        timeline.append(current)
    return decisions, timeline, samples


def test_a_load_step_scales_up_within_the_window_once_per_pod_needed():
    # 0 -> 8 requests at t=0 on 1 pod, 4 per pod: 2 pods. The mean over the
    # 10 s window passes 4 after a little more than half of it.
    decisions, timeline, _ = run(POLICY, lambda t: 8 if t >= 0 else 0, 40,
                                 samples=[Sample(float(t), 0.0) for t in range(-10, 0)])
    assert [(d.reason, d.replicas) for _, d in decisions] == [("ScaledUp", 2)]
    first = decisions[0][0]
    assert 4 <= first <= 6, first
    assert "1 -> 2" in decisions[0][1].message and "target 4 per pod" in decisions[0][1].message
    assert timeline[-1] == 2


def test_a_bigger_step_takes_one_decision_per_step_of_the_mean_never_more_pods_than_needed():
    decisions, timeline, _ = run(POLICY, lambda t: 16, 40, samples=[Sample(float(t), 0.0) for t in range(-10, 0)])
    ups = [d.replicas for _, d in decisions]
    assert ups == sorted(ups) and ups[-1] == 4 and len(ups) <= 3   # 1 -> ... -> 4: at most one decision per new pod
    assert all(d.reason == "ScaledUp" for _, d in decisions)


def test_a_short_spike_is_averaged_away():
    # 3 s of two pods' worth (8 requests) among 2: the window's mean stays under 4.
    _, timeline, _ = run(POLICY, lambda t: 8 if 20 <= t < 23 else 2, 60)
    assert set(timeline) == {1}


def test_noisy_load_around_a_level_does_not_flap():
    # Closed-loop clients between two requests: 6, 7 or 8 in flight (target 4).
    decisions, timeline, _ = run(POLICY, lambda t: 7 + (t % 3) - 1, 300, current=2)
    assert decisions == [] and set(timeline) == {2}


def test_scale_down_waits_the_whole_delay_then_goes_to_what_the_delay_called_for():
    samples = [Sample(float(t), 12.0) for t in range(0, 60)]
    # The load drops from 12 (3 pods) to 2 (1 pod) at t=60.
    decisions, timeline, _ = run(POLICY, lambda t: 2, 80, current=3, samples=samples, start=60)
    assert all(d.reason == "ScaledDown" for _, d in decisions) and decisions[-1][1].replicas == 1
    assert [d.replicas for _, d in decisions] == sorted({d.replicas for _, d in decisions}, reverse=True)
    # Not before the delay (60 s), and done within the window (10 s) the mean needed to fall.
    t = decisions[0][0]
    assert 60 + 60 <= t and decisions[-1][0] <= 60 + 60 + 10, decisions
    assert timeline[: t - 60] == [3] * (t - 60)


def test_a_burst_within_the_delay_keeps_the_pods_it_needed():
    # 3 pods' worth until t=60, then 1 pod's, with one 20 s burst of 3 pods' worth at 100-120.
    load = lambda t: 12 if t < 60 or 100 <= t < 120 else 2
    decisions, timeline, _ = run(POLICY, load, 220, current=3)
    assert all(d.reason == "ScaledDown" for _, d in decisions) and decisions[-1][1].replicas == 1
    assert decisions[0][0] >= 120 + 60  # the delay counts from the burst's end


def test_scale_down_steps_through_what_the_delay_saw():
    # 4 pods' worth, then 2 pods' worth for 40 s, then nothing: 4 -> 2 -> 1, each after the delay.
    load = lambda t: 16 if t < 30 else (8 if t < 100 else 0)
    decisions, _, _ = run(POLICY, load, 250, current=4)
    assert [d.replicas for _, d in decisions if d.replicas in (2, 1)] == [2, 1]
    two = next(t for t, d in decisions if d.replicas == 2)
    assert 30 + 60 <= two < 100 + 60  # 2 once the delay after the 4-pod load passed, before 1
    assert all(d.reason == "ScaledDown" for _, d in decisions)


def test_pods_still_starting_count_toward_the_target():
    # 2 desired, 1 ready, 1 pending for five minutes; 8 requests queue on the
    # ready pod meanwhile (a constant load: the clients wait for answers).
    # A ratio per ready pod would read 8 per pod and keep doubling.
    samples = []
    current = 2
    for t in range(300):
        samples.append(Sample(float(t), 8.0))
        d = decide(POLICY, samples, current, float(t), ready=1)
        assert not d.changed and d.replicas == 2, d
    assert "2 desired, 1 ready" in d.message


def test_min_and_max_bound_every_decision():
    assert decide(POLICY, [], 0, 0.0).replicas == 1 and decide(POLICY, [], 0, 0.0).reason == "BelowMinimum"
    assert decide(POLICY, [], 7, 0.0).replicas == 4 and decide(POLICY, [], 7, 0.0).reason == "AboveMaximum"
    decisions, timeline, _ = run(POLICY, lambda t: 1000, 30)
    assert max(timeline) == 4
    decisions, timeline, _ = run(POLICY, lambda t: 0, 300, current=1)
    assert decisions == [] and set(timeline) == {1}


def test_no_sample_no_decision():
    d = decide(POLICY, [Sample(0.0, 50.0)], 1, 30.0)
    assert not d.changed and d.reason == "NoSignal"


ZERO = Policy(min_replicas=0, max_replicas=4, target=4, window=10, scale_down_delay=30)


def test_a_held_request_scales_from_zero_at_once():
    idle = [Sample(float(t), 0.0) for t in range(0, 40)]
    # The activator answers the operator's long poll the moment it holds a request.
    d = decide(ZERO, idle + [Sample(40.2, 1.0, held=1)], 0, 40.2)
    assert d.changed and d.replicas == 1 and d.reason == "ScaledFromZero"
    assert "1 held" in d.message


def test_an_idle_resource_goes_to_zero_after_its_delay_and_not_before():
    samples = [Sample(float(t), 2.0) for t in range(0, 30)]
    decisions, timeline, _ = run(ZERO, lambda t: 0, 60, current=1, samples=samples, start=30)
    assert [(d.reason, d.replicas) for _, d in decisions] == [("ScaledToZero", 0)]
    t = decisions[0][0]
    assert 30 + 30 <= t <= 30 + 30 + 10, t


def test_anything_in_flight_keeps_a_pod():
    # One long stream: 1 in flight, far under the target of 4; min 0.
    decisions, timeline, _ = run(ZERO, lambda t: 1, 200, current=1)
    assert decisions == [] and set(timeline) == {1}


def test_scaling_down_needs_a_whole_delay_of_samples():
    # A restarted operator has seen 10 s of an idle resource: not enough to remove a pod.
    recent = [Sample(float(t), 0.0) for t in range(100, 110)]
    assert decide(ZERO, recent, 2, 110.0).reason == "Steady"
    # A hole of more than MAX_GAP_SECONDS in what it saw (the router unreachable) is not enough either.
    holed = [Sample(float(t), 0.0) for t in range(0, 100) if not 80 <= t < 80 + autoscale.MAX_GAP_SECONDS + 2]
    assert decide(ZERO, holed, 2, 99.0).reason == "Steady"
    whole = [Sample(float(t), 0.0) for t in range(0, 100)]
    assert decide(ZERO, whole, 2, 99.0).replicas == 0


def test_a_delay_of_zero_scales_down_with_the_window():
    policy = Policy(min_replicas=0, max_replicas=4, target=4, window=5, scale_down_delay=0)
    samples = [Sample(float(t), 8.0) for t in range(0, 10)] + [Sample(float(t), 0.0) for t in range(10, 16)]
    assert decide(policy, samples, 2, 15.0).replicas == 0


@pytest.mark.parametrize("load,pods", [(4.0, 1), (4.01, 2), (8.0, 2), (0.5, 1), (0.0, 0)])
def test_the_target_is_absolute_per_pod(load, pods):
    w = autoscale.Window([Sample(0.0, load)], 10)
    assert autoscale.recommend(ZERO, w, 0.0) == pods


def test_policy_from_the_spec_with_the_crds_defaults():
    spec = make_resource({"model": {"source": "builtin:smollm2-135m-instruct"}, "autoscaling": {}})["spec"]
    p = autoscale.policy(spec)
    assert p == Policy(min_replicas=1, max_replicas=4, target=8, window=10, scale_down_delay=300)
    spec["autoscaling"]["targetRequestsPerPod"] = 3
    spec["concurrency"]["maxConcurrentStreams"] = 2
    assert autoscale.policy(spec).target == 3
    del spec["autoscaling"]["targetRequestsPerPod"]
    assert autoscale.policy(spec).target == 2  # the pods' slots by default
    assert autoscale.policy(make_resource()["spec"]) is None


def test_the_crds_defaults_are_the_deciders():
    from builder_helpers import SCHEMA
    props = SCHEMA["properties"]["autoscaling"]["properties"]
    assert {k: props[k]["default"] for k in autoscale.DEFAULTS} == autoscale.DEFAULTS
