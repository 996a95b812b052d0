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
from sense_gateway.registry import RECENT_ENVELOPES, DeviceRecord, DeviceRegistry, RegistryUnavailable
from sense_gateway.sequence import content_digest, judge
from sense_gateway.sinks import MetricSink, SinkError, device_point, reading_points


class Outcome(enum.Enum):
    WRITTEN = "written"
    DUPLICATE = "duplicate"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Result:
    outcome: Outcome
    reason: str = ""
    #: for FAILED: whether trying again later may succeed
    retryable: bool = True


#: results are immutable: one for every message written
_WRITTEN = Result(Outcome.WRITTEN)


class BatchProcessor:
    def __init__(self, registry: DeviceRegistry, sinks: list[MetricSink],
                 clock: Callable[[], float] = time.time):
        self.registry = registry
        self.sinks = sinks
        self.clock = clock

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

        results: list[Result | None] = [None] * len(envelopes)
        redelivered: set[int] = set()
        points = []
        # Per device touched: [record as loaded, state, last_seen, last_source,
        # recent ids]; the records are rebuilt once per device, not per message.
        touched: dict[str, list] = {}
        for i, envelope in enumerate(envelopes):
            work = touched.get(envelope.device)
            if work is None:
                record = records.get(envelope.device) or DeviceRecord(
                    envelope.device, envelope.received, envelope.received, envelope.source)
                work = [record, record.state, record.last_seen, record.last_source,
                        list(record.recent)]
            recent = work[4]
            if envelope.id in recent:
                # The queue delivered this envelope again (at-least-once):
                # it was fully processed, so it changes nothing.
                results[i] = Result(Outcome.DUPLICATE, "already processed")
                redelivered.add(i)
                continue
            touched[envelope.device] = work
            seq = envelope.seq
            verdict = judge(work[1], seq, content_digest(envelope.readings, envelope.received),
                            envelope.boot) if seq is not None else judge(work[1], None)
            work[1] = verdict.state
            if envelope.received >= work[2]:
                work[2] = envelope.received
                work[3] = envelope.source
            recent.append(envelope.id)
            if len(recent) > RECENT_ENVELOPES:
                del recent[:-RECENT_ENVELOPES]
            if verdict.verdict.accepted:
                points.extend(reading_points(envelope))
            else:
                results[i] = Result(Outcome.DUPLICATE, f"sequence number {envelope.seq} seen before")
        # Built field by field: dataclasses.replace costs several times more.
        updated = {device: DeviceRecord(record.id, record.first_seen, last_seen, last_source,
                                        state, tuple(recent), record.version)
                   for device, (record, state, last_seen, last_source, recent) in touched.items()}

        now = self.clock()
        points.extend(device_point(record, now) for record in updated.values())
        for sink in self.sinks:
            try:
                sink.write(points)
            except SinkError as e:
                if not e.retryable and len(envelopes) > 1:
                    # The server refused the batch: find the messages at
                    # fault by halving it, in order, until each refused
                    # part is one message. One bad message in a batch of
                    # thousands costs a few dozen writes, not thousands.
                    half = len(envelopes) // 2
                    return (self.process_batch(envelopes[:half])
                            + self.process_batch(envelopes[half:]))
                return self._failed(results, redelivered, str(e), e.retryable)
            except Exception as e:
                return self._failed(results, redelivered, f"{sink.name}: {type(e).__name__}: {e}")

        try:
            conflicts = self.registry.commit(list(updated.values()))
        except Exception as e:
            return self._failed(results, redelivered, f"registry: {type(e).__name__}: {e}")
        if not conflicts:
            return [result or _WRITTEN for result in results]
        lost_race = Result(Outcome.FAILED, "another processor updated the device first")
        return [
            lost_race if envelope.device in conflicts and i not in redelivered
            else results[i] or _WRITTEN
            for i, envelope in enumerate(envelopes)
        ]

    @staticmethod
    def _failed(results, redelivered: set[int], reason: str, retryable: bool = True) -> list[Result]:
        """Everything but redeliveries failed and is to be retried."""
        failure = Result(Outcome.FAILED, reason, retryable)
        return [results[i] if i in redelivered else failure for i in range(len(results))]

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.registry.close()
