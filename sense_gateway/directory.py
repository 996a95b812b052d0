"""What the gateway knows about devices without asking anyone: the keys of
credentialed devices, and the ids already registered.

The DTLS handshake asks for a device's key synchronously, and every plain
CoAP write asks whether its device has a credential or is new: both are
answered from memory here (:class:`DeviceDirectory`), never by a query on
the reactor thread. :class:`DirectoryService` keeps that memory fresh from
the credential store and the registry on a thread of its own: it polls the
store's change serial every ``security.refresh_interval`` seconds (a new,
rotated or revoked key is in effect within that time, without a restart),
and every ``registry.refresh_interval`` reloads the registered ids and
every key (so nothing a missed change left behind outlives that).
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger

from sense_gateway.limits import TokenBuckets
from sense_gateway.threads import BlockingThreads

log = Logger()

#: seconds a device admitted by this gateway may stay unregistered (its
#: envelope lost or refused later) before it no longer counts
ADMITTED_LIFETIME = 3600.0


class DeviceDirectory:
    """Keys, credentialed devices and registered ids, in memory."""

    def __init__(self, now: Callable[[], float], *, max_devices: int,
                 new_devices_per_minute: float):
        self._now = now
        self.max_devices = max_devices
        #: False until the credentials are first loaded: nothing can be
        #: judged before
        self.ready = False
        #: whether the registered ids are known (until they are, the limits
        #: on new devices cannot be judged and do not apply)
        self.registered_known = False
        self._keys: dict[str, bytes] = {}
        self._known: set[str] = set()
        # devices this gateway let plain CoAP create, not registered yet
        self._admitted: dict[str, float] = {}
        self._new_devices = TokenBuckets(new_devices_per_minute / 60.0, new_devices_per_minute,
                                         now)
        #: the store serial the keys are at
        self.serial = 0
        #: called with a device whose credential was revoked or rotated
        self.on_key_withdrawn: Callable[[str], object] | None = None

    def psk_for(self, identity: str) -> bytes | None:
        """The key a DTLS peer claiming *identity* must hold, or ``None``."""
        return self._keys.get(identity)

    def has_credential(self, device: str) -> bool:
        return device in self._keys

    def credentialed(self) -> int:
        return len(self._keys)

    def devices(self) -> int:
        """Devices counted against ``registry.max_devices``."""
        return len(self._known) + len(self._admitted)

    def admit(self, device: str, source: str) -> str | None:
        """Whether plain CoAP may write as *device* from *source*: ``None``
        if so (a new device is counted from now on), else why not."""
        if device in self._known or device in self._admitted or device in self._keys:
            return None
        if not self.registered_known:
            return None
        if self.devices() >= self.max_devices:
            return f"device limit reached ({self.max_devices})"
        if self._new_devices.take(source):
            return "too many new devices from this address"
        self._admitted[device] = self._now()
        return None

    def apply_changes(self, serial: int, changes) -> None:
        """Credentials changed in the store (:meth:`CredentialStore.changes`)."""
        for credential in changes:
            old = self._keys.get(credential.device)
            if credential.key is None:
                self._keys.pop(credential.device, None)
            else:
                self._keys[credential.device] = credential.key
            if old is not None and old != credential.key and self.on_key_withdrawn is not None:
                try:
                    self.on_key_withdrawn(credential.device)
                except Exception:
                    log.failure("ending sessions of {device} failed", device=credential.device)
        self.serial = serial

    def replace_keys(self, serial: int, credentials) -> None:
        """Every credential the store holds (:meth:`CredentialStore.changes`
        from 0): a full reconcile, which also drops keys the store no
        longer mentions (a store restored from a backup, say)."""
        keys = {c.device: c.key for c in credentials if c.key is not None}
        withdrawn = [device for device, key in self._keys.items() if keys.get(device) != key]
        self._keys = keys
        self.serial = serial
        if self.on_key_withdrawn is not None:
            for device in withdrawn:
                try:
                    self.on_key_withdrawn(device)
                except Exception:
                    log.failure("ending sessions of {device} failed", device=device)

    def apply_registered(self, ids) -> None:
        """The ids the registry holds now."""
        self._known = set(ids)
        self.registered_known = True
        oldest = self._now() - ADMITTED_LIFETIME
        self._admitted = {device: at for device, at in self._admitted.items()
                          if device not in self._known and at > oldest}


class DirectoryService(Service):
    """Refreshes a :class:`DeviceDirectory` from its stores, off the reactor.

    *open_store* and *open_registry* build the credential store and the
    registry; they are called on the service's own thread, which is the
    only one to use them. Without *open_store* (a registry that keeps no
    credentials) no device has a key.
    """

    def __init__(self, directory: DeviceDirectory, open_store, open_registry, reactor, *,
                 interval: float, registry_interval: float):
        self.directory = directory
        self.reactor = reactor
        self.interval = interval
        self.registry_interval = registry_interval
        self._open_store, self._open_registry = open_store, open_registry
        self._store = self._registry = None
        self.threads = BlockingThreads("sense-directory", reactor, close=self._close)
        self._loop = task.LoopingCall(self.refresh)
        self._loop.clock = reactor
        self._ids_due = 0.0
        self._running = None
        #: why the last refresh failed, for /healthz (None: it did not)
        self.failure: str | None = None
        self._waiting_ready: list[defer.Deferred] = []

    def when_ready(self) -> defer.Deferred:
        """Fires once the directory has been loaded (the listeners open then:
        before it, nothing could be judged)."""
        if self.directory.ready:
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiting_ready.append(d)
        return d

    def startService(self) -> None:
        super().startService()
        self.threads.startService()
        self._loop.start(self.interval, now=True)

    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        # A refresh under way finishes; then the stores close on their thread.
        yield self.threads.stopService()

    def refresh(self):
        """One refresh; a failing one is logged and the old view kept."""
        if self._running is not None:
            return None
        want_ids = self.reactor.seconds() >= self._ids_due
        self._running = d = self.threads.run(self._read, self.directory.serial, want_ids)
        d.addCallbacks(self._apply, self._failed, callbackArgs=(want_ids,))
        d.addBoth(self._done)
        return d

    def _read(self, since: int, want_ids: bool):
        serial, changes, full = 0, [], False
        if self._open_store is not None:
            if self._store is None:
                self._store = self._open_store()
            serial = self._store.serial()
            # Now and then (with the device ids), and whenever the serial
            # went back, everything is read again, not only what changed.
            full = want_ids or serial < since
            if full:
                changes = self._store.changes(0)
            elif serial != since:
                changes = self._store.changes(since)
        ids = ids_failure = None
        if want_ids:
            # The registry may be down while readings are still queued: the
            # limits on new devices wait for it, nothing else does.
            try:
                if self._registry is None:
                    self._registry = self._open_registry()
                ids = self._registry.ids()
            except Exception as e:
                ids_failure = f"registry: {type(e).__name__}: {e}"[:200]
                if self._registry is not None:
                    self._registry.close()
                    self._registry = None
        return serial, changes, full, ids, ids_failure

    def _apply(self, result, want_ids: bool) -> None:
        serial, changes, full, ids, ids_failure = result
        directory = self.directory
        if full:
            directory.replace_keys(serial, changes)
        else:
            directory.apply_changes(serial, changes)
        if changes and not full:
            log.info("credentials: {count} changed, {credentialed} devices with a key",
                     count=len(changes), credentialed=directory.credentialed())
        if ids is not None:
            directory.apply_registered(ids)
            self._ids_due = self.reactor.seconds() + self.registry_interval
        elif ids_failure is not None:
            log.warn("device ids not loaded (limits on new devices wait): {why}",
                     why=ids_failure)
        self.failure = ids_failure
        if not directory.ready:
            directory.ready = True
            waiting, self._waiting_ready = self._waiting_ready, []
            for d in waiting:
                d.callback(None)

    def _failed(self, failure) -> None:
        self.failure = f"{failure.type.__name__}: {failure.getErrorMessage()}"[:200]
        log.warn("device directory not refreshed: {why}", why=self.failure)

    def _done(self, _) -> None:
        self._running = None

    def _close(self) -> None:
        for backend in (self._store, self._registry):
            if backend is not None:
                backend.close()
