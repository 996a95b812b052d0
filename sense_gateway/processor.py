"""The processing core: a batch of envelopes in, one outcome per envelope out.

Plain synchronous Python, shared by the in-process worker and the AWS
Lambda handler. For each envelope it judges the device's sequence number
against the registry, writes the readings of accepted ones (and the
devices' counters) to every sink, and only then commits the registry, so
a sequence number is marked seen only after every sink has the readings
(a failed write is retried, never later dropped as a duplicate).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass

from sense_gateway.envelope import Envelope
from sense_gateway.liveness import DeviceState, LivenessPolicy, add_arrival, liveness
from sense_gateway.registry import RECENT_ENVELOPES, DeviceRecord, DeviceRegistry, RegistryUnavailable
from sense_gateway.sequence import Verdict, content_digest, judge
from sense_gateway.sinks import MetricSink, SinkError, device_point, reading_points


class Outcome(enum.Enum):
    WRITTEN = "written"
    DUPLICATE = "duplicate"
    FAILED = "failed"
    #: a sink refused this message's readings: to the dead letters at once
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class Result:
    outcome: Outcome
    reason: str = ""
    #: for FAILED: whether trying again later may succeed
    retryable: bool = True
    #: for FAILED: a sink or the registry could not be used; the message
    #: itself is not at fault, so the try need not count against it
    unavailable: bool = False


def _owners(envelopes: list[Envelope], results: list[Result | None],
            devices: int) -> list[int | None]:
    """The index of the envelope each point of a write came from (None for
    the devices' counters), in the order :meth:`BatchProcessor._judge`
    made them: one point per reading of each envelope to be written.
    Worked out only when a refusal names points, not for every batch."""
    owners: list[int | None] = [i for i, result in enumerate(results) if result is None
                                for _ in envelopes[i].readings]
    return owners + [None] * devices


class _SinkBug(SinkError):
    """A sink raised something else than SinkError: its own bug, not an
    outage, so it counts against the messages (which end in the dead
    letters if it persists)."""


#: results are immutable: one for every message written
_WRITTEN = Result(Outcome.WRITTEN)
_REDELIVERED = Result(Outcome.DUPLICATE, "already processed")


class BatchProcessor:
    def __init__(self, registry: DeviceRegistry, sinks: list[MetricSink],
                 clock: Callable[[], float] = time.time,
                 policy: LivenessPolicy = LivenessPolicy()):
        self.registry = registry
        self.sinks = sinks
        self.clock = clock
        self.policy = policy

    def process_batch(self, envelopes: list[Envelope]) -> list[Result]:
        """One :class:`Result` per envelope, in order.

        Raises :class:`RegistryUnavailable` when the registry cannot be
        read: then nothing could be judged and the whole batch is retried.
        """
        if not envelopes:
            return []
        try:
            records = self.registry.load({e.device for e in envelopes})
        except Exception as e:
            raise RegistryUnavailable(f"registry: {type(e).__name__}: {e}") from e

        # Envelopes a sink refused, by index, with the server's message:
        # each refusal that names its lines takes those messages out and
        # the rest is judged and written again, in the same call.
        refused: dict[int, str] = {}
        while True:
            results, redelivered, points, updated = self._judge(envelopes, records, refused)
            failure = self._write(points)
            if failure is None:
                break
            if failure.retryable:
                return self._failed(results, redelivered, str(failure),
                                    unavailable=not isinstance(failure, _SinkBug))
            owners = _owners(envelopes, results, len(updated))
            named = {owners[i] for i in failure.refused if i < len(owners)}
            if None in named:
                # The devices' own counters were refused: the server's schema
                # disagrees with ours, which no message can fix.
                return self._failed(results, redelivered, str(failure), unavailable=True)
            if named - refused.keys():
                refused.update((i, str(failure)) for i in named if i not in refused)
                continue
            if len(envelopes) > 1:
                # A refusal naming no line: find the messages at fault by
                # halving the batch, in order, until each refused part is
                # one message.
                half = len(envelopes) // 2
                return (self.process_batch(envelopes[:half])
                        + self.process_batch(envelopes[half:]))
            reason = str(failure)
            return [Result(Outcome.REFUSED, reason, False) if r is None else r for r in results]

        try:
            conflicts = self.registry.commit(list(updated.values()))
        except Exception as e:
            return self._failed(results, redelivered, f"registry: {type(e).__name__}: {e}",
                                unavailable=True)
        if not conflicts:
            return [result or _WRITTEN for result in results]
        lost_race = Result(Outcome.FAILED, "another processor updated the device first")
        return [
            lost_race if envelope.device in conflicts and results[i] is None
            else results[i] or _WRITTEN
            for i, envelope in enumerate(envelopes)
        ]

    def _judge(self, envelopes: list[Envelope], records: dict[str, DeviceRecord],
               refused: dict[int, str]):
        """Judge every envelope but the *refused* ones against *records*.

        Returns (results: None where the message is to be written,
        the indices of redeliveries, the points, the updated records by
        device).
        """
        results: list[Result | None] = [None] * len(envelopes)
        redelivered: set[int] = set()
        points: list = []
        add_points = points.extend
        # Per device touched: [record as loaded, state, last_seen, last_source,
        # recent ids, inter-arrival times]; the records are rebuilt once per
        # device, not per message.
        touched: dict[str, list] = {}
        get_work = touched.get
        # Looked up once, not per message.
        duplicate, digest_of, judged, arrival, points_of = (
            Verdict.DUPLICATE, content_digest, judge, add_arrival, reading_points)
        for i, envelope in enumerate(envelopes):
            if refused and i in refused:
                results[i] = Result(Outcome.REFUSED, refused[i], False)
                continue
            device = envelope.device
            work = get_work(device)
            if work is None:
                record = records.get(device) or DeviceRecord(
                    device, envelope.received, envelope.received, envelope.source)
                work = [record, record.state, record.last_seen, record.last_source,
                        list(record.recent), list(record.intervals)]
            recent = work[4]
            if envelope.id in recent:
                # The queue delivered this envelope again (at-least-once):
                # it was fully processed, so it changes nothing.
                results[i] = _REDELIVERED
                redelivered.add(i)
                continue
            touched[device] = work
            seq = envelope.seq
            received = envelope.received
            verdict = judged(work[1], seq, digest_of(envelope.readings, received),
                             envelope.boot) if seq is not None else judged(work[1], None)
            work[1] = verdict.state
            if received >= work[2]:
                # Any message shows the device alive, a duplicate too.
                arrival(work[5], work[2], received)
                work[2] = received
                work[3] = envelope.source
            recent.append(envelope.id)
            if len(recent) > RECENT_ENVELOPES:
                del recent[:-RECENT_ENVELOPES]
            if verdict.verdict is not duplicate:
                add_points(points_of(envelope))
            else:
                results[i] = Result(Outcome.DUPLICATE, f"sequence number {seq} seen before")
        # Built field by field: dataclasses.replace costs several times more.
        updated = {device: DeviceRecord(device, record.first_seen, last_seen, last_source,
                                        state, tuple(recent), record.version, tuple(intervals),
                                        record.interval)
                   for device, (record, state, last_seen, last_source, recent, intervals)
                   in touched.items()}
        now = self.clock()
        policy = self.policy
        add_points([device_point(record, now, liveness(record, now, policy))
                    for record in updated.values()])
        return results, redelivered, points, updated

    def _write(self, points) -> SinkError | None:
        """Write *points* to every sink; the first failure, if any."""
        for sink in self.sinks:
            try:
                sink.write(points)
            except SinkError as e:
                return e
            except Exception as e:
                return _SinkBug(f"{sink.name}: {type(e).__name__}: {e}")
        return None

    @staticmethod
    def _failed(results, redelivered: set[int], reason: str, retryable: bool = True,
                unavailable: bool = False) -> list[Result]:
        """Everything but redeliveries failed and is to be retried."""
        failure = Result(Outcome.FAILED, reason, retryable, unavailable)
        return [results[i] if i in redelivered else failure for i in range(len(results))]

    def sweep(self) -> int:
        """Write the state of every late and offline device to every sink
        (a ``sense_device`` point now, with ``state``, ``silent`` and
        ``interval``): a silent device sends nothing that would. Returns
        how many devices were written; a sink's failure raises."""
        now = self.clock()
        points = []
        for record in self.registry.devices():
            judged = liveness(record, now, self.policy)
            if judged.state in (DeviceState.LATE, DeviceState.OFFLINE):
                points.append(device_point(record, now, judged))
        failure = self._write(points) if points else None
        if failure is not None:
            raise failure
        return len(points)

    def check(self) -> None:
        """Raise if the registry or a sink cannot be reached now."""
        self.registry.check()
        for sink in self.sinks:
            sink.check()

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.registry.close()
