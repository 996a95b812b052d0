"""Configuration: defaults < TOML file < SENSE_* environment < options."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from sense_gateway.config import Config, env_names, load_config, worker_count
from sense_gateway.errors import ConfigError
from sense_gateway.plugins import make_plugin_manager
from sense_gateway.queues import queue_backend, queue_backends
from sense_gateway.queues.sqlite_settings import SQLiteQueueSettings

REPO = Path(__file__).resolve().parent.parent


class ConfigTests(SynchronousTestCase):
    def write(self, text: str) -> str:
        path = self.mktemp()
        Path(path).write_text(text)
        return path

    def test_example_file_states_every_key_with_its_default(self):
        path = REPO / "etc" / "sense-gateway.toml"
        with path.open("rb") as f:
            document = tomllib.load(f)
        # (A queue backend's own table, such as [queue.sqlite], is checked below.)
        stated = {(table, key) for table, values in document.items() if isinstance(values, dict)
                  for key, value in values.items() if not isinstance(value, dict)}
        stated |= {(None, key) for key, value in document.items() if not isinstance(value, dict)}
        # Every key a SENSE_* variable can set is a configuration key.
        self.assertEqual(sorted(set(env_names().values()) - stated, key=str), [],
                         "keys missing from the example file")
        self.assertEqual(sorted(stated - set(env_names().values()), key=str), [],
                         "keys in the example file that are not configuration keys")

    def test_example_file_states_the_defaults(self):
        # etc/sense-gateway.toml documents every key with its default.
        example = load_config(REPO / "etc" / "sense-gateway.toml", environ={})
        self.assertEqual(dataclasses.replace(example, sections={}), Config(sections={}))
        # ... and every built-in queue backend's own table, key for key.
        pm = make_plugin_manager(example.disable_plugins, plugins_dir=self.mktemp())
        declared = {name: b.settings for name, b in queue_backends(example, pm).items()}
        self.assertEqual({t for t in example.sections if t.startswith("queue.")},
                         {f"queue.{name}" for name, s in declared.items() if s is not None})
        for name, settings in declared.items():
            if settings is not None:
                self.assertEqual(dict(example.section(f"queue.{name}")),
                                 dataclasses.asdict(settings()))

    def test_file_overrides_defaults(self):
        config = load_config(self.write('role = "gateway"\n[coap]\nport = 5700\n'), environ={})
        self.assertEqual((config.role, config.coap.port, config.coap.bind), ("gateway", 5700, "::"))

    def test_environment_overrides_file(self):
        path = self.write("[coap]\nport = 5700\n")
        config = load_config(path, environ={"SENSE_COAP_PORT": "5800", "SENSE_KEEP_RAW": "true"})
        self.assertEqual((config.coap.port, config.keep_raw), (5800, True))

    def test_options_override_environment(self):
        config = load_config(environ={"SENSE_COAP_PORT": "5800"}, overrides={"coap.port": 5900})
        self.assertEqual(config.coap.port, 5900)

    def test_list_from_environment(self):
        config = load_config(environ={"SENSE_DISABLE_PLUGINS": "a, b"})
        self.assertEqual(config.disable_plugins, ("a", "b"))

    def test_plugin_tables_are_kept_for_plugins(self):
        config = load_config(self.write('[example_kv]\nmeasurement = "kv"\n'), environ={})
        self.assertEqual(config.section("example_kv")["measurement"], "kv")
        self.assertEqual(dict(config.section("absent")), {})

    def assertConfigError(self, message: str, *args, **kwargs):
        error = self.assertRaises(ConfigError, load_config, *args, **kwargs)
        self.assertIn(message, str(error))

    def test_unknown_key_is_named(self):
        path = self.write("[coap]\nprot = 1\n")
        self.assertConfigError(f"{path}: coap.prot: unknown configuration key", path, environ={})

    def test_wrong_type_is_named(self):
        path = self.write('[queue]\nmax_receives = "many"\n')
        self.assertConfigError("queue.max_receives: expected int, got 'many'", path, environ={})

    def test_bad_environment_value_is_named(self):
        self.assertConfigError("coap.port: expected int", environ={"SENSE_COAP_PORT": "x"})

    def test_unknown_environment_variable_is_named(self):
        self.assertConfigError("SENSE_COAP_PROT", environ={"SENSE_COAP_PROT": "1"})

    def test_bad_role(self):
        self.assertConfigError("role: must be one of all, gateway, processor",
                               environ={}, overrides={"role": "both"})

    def test_bad_bind_address(self):
        self.assertConfigError("coap.bind: not an IP address", environ={"SENSE_COAP_BIND": "localhost"})

    def test_zero_durations_are_refused_by_name(self):
        for table, key in [("queue", "visibility_timeout"), ("processor", "retry_base"),
                           ("coap", "exchange_lifetime"), ("store", "retention_days")]:
            path = self.write(f"[{table}]\n{key} = 0.0\n")
            self.assertConfigError(f"{table}.{key}: must be positive, got 0.0", path, environ={})

    def test_negative_counts_are_refused_by_name(self):
        self.assertConfigError("queue.retry_after: must be 0 or more, got -1",
                               environ={"SENSE_QUEUE_RETRY_AFTER": "-1"})
        self.assertConfigError("processor.poll_interval: must be 0 or more, got -1.0",
                               environ={"SENSE_PROCESSOR_POLL_INTERVAL": "-1"})

    def test_retry_max_below_retry_base_is_refused(self):
        path = self.write("[processor]\nretry_base = 10.0\nretry_max = 5.0\n")
        self.assertConfigError("processor.retry_max: must be at least processor.retry_base", path,
                               environ={})

    def test_invalid_toml_is_reported(self):
        path = self.write("[coap\n")
        self.assertConfigError("not valid TOML", path, environ={})

    def test_missing_file(self):
        self.assertConfigError("no such file", self.mktemp(), environ={})


class WorkersConfigTests(SynchronousTestCase):
    def test_a_count_from_the_file_or_auto(self):
        path = self.mktemp()
        Path(path).write_text("workers = 3\n")
        self.assertEqual(worker_count(load_config(path, environ={})), 3)
        auto = load_config(environ={"SENSE_WORKERS": "auto"})
        self.assertEqual(worker_count(auto), len(os.sched_getaffinity(0)))

    def test_not_a_count_is_refused(self):
        error = self.assertRaises(ConfigError, load_config, environ={"SENSE_WORKERS": "0"})
        self.assertEqual(str(error), "workers: must be a count of at least 1 or 'auto', got '0'")

    def test_a_processor_has_workers_too(self):
        # Each processes its own shards (tests/test_workers.py).
        config = load_config(environ={"SENSE_WORKERS": "2", "SENSE_ROLE": "processor"})
        self.assertEqual((config.role, worker_count(config)), ("processor", 2))


class QueueBackendSettingsTests(SynchronousTestCase):
    """A queue backend's own table, [queue.NAME]: the built-in sqlite one
    goes the road a plugin's goes (tests/test_plugins.py)."""

    def settle(self, text: str = "", environ=None):
        path = self.mktemp()
        Path(path).write_text(text)
        config = load_config(path, environ=environ or {})
        return queue_backend(config, make_plugin_manager((), plugins_dir=self.mktemp()))

    def test_sqlite_settings_come_from_their_table(self):
        _, settings = self.settle('[queue.sqlite]\nsynchronous = "normal"\nmax_batch = 10\n')
        self.assertEqual(settings, SQLiteQueueSettings(synchronous="normal", max_batch=10))

    def test_environment_overrides_the_table(self):
        _, settings = self.settle('[queue.sqlite]\nmax_batch = 10\n',
                                  environ={"SENSE_QUEUE_SQLITE_MAX_BATCH": "20"})
        self.assertEqual(settings.max_batch, 20)

    def test_wrong_type_is_named(self):
        error = self.assertRaises(ConfigError, self.settle, '[queue.sqlite]\nmax_batch = "lots"\n')
        self.assertEqual(str(error), "queue.sqlite.max_batch: expected int, got 'lots'")

    def test_bad_value_is_named(self):
        error = self.assertRaises(ConfigError, self.settle,
                                  environ={"SENSE_QUEUE_SQLITE_SYNCHRONOUS": "sometimes"})
        self.assertIn("queue.sqlite.synchronous: must be 'full' or 'normal'", str(error))

    def test_unknown_key_in_a_backend_table_is_named(self):
        error = self.assertRaises(ConfigError, self.settle, '[queue.sqlite]\nsize = 1\n')
        self.assertIn("queue.sqlite.size: unknown configuration key", str(error))

    def test_table_of_no_backend_is_named(self):
        error = self.assertRaises(ConfigError, self.settle, '[queue.kafka]\nbrokers = "x"\n')
        self.assertEqual(str(error), "queue.kafka: no queue backend named 'kafka'; "
                                     "available: sqlite, sqs")

    def test_unknown_queue_variable_is_named(self):
        error = self.assertRaises(ConfigError, self.settle,
                                  environ={"SENSE_QUEUE_SQLITE_SIZE": "1"})
        self.assertEqual(str(error), "SENSE_QUEUE_SQLITE_SIZE: unknown SENSE_ environment variable")

    def test_moved_keys_say_where_they_went(self):
        error = self.assertRaises(ConfigError, self.settle, '[queue]\nsynchronous = "full"\n')
        self.assertIn("queue.synchronous: moved to queue.sqlite.synchronous", str(error))
        error = self.assertRaises(ConfigError, self.settle,
                                  environ={"SENSE_QUEUE_PATH": "/tmp/q"})
        self.assertIn("(queue.path moved to queue.sqlite.path)", str(error))


class DevicesConfigTests(SynchronousTestCase):
    def test_offline_must_come_after_late(self):
        error = self.assertRaises(ConfigError, load_config, environ={
            "SENSE_DEVICES_OFFLINE_AFTER": "2", "SENSE_DEVICES_LATE_AFTER": "3"})
        self.assertIn("devices.offline_after: must be more than devices.late_after (3.0)",
                      str(error))
        self.assertEqual(load_config(environ={"SENSE_DEVICES_METRICS_LIMIT": "0"})
                         .devices.metrics_limit, 0)
