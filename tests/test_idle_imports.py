"""What an idle agent does not import: code loaded on first use (memory at idle, the
60 MB target of bench/ping_load.py), and the deferred metrics registry that allows it."""

import subprocess
import sys
from pathlib import Path

import pytest

from agent.metrics import Metrics

REPO = Path(__file__).resolve().parent.parent


def test_plugins_import_neither_prometheus_client_nor_the_xml_parser():
    code = ("import sys, agent.app, agent.cli\n"
            "for p in ('host', 'iommu', 'devices', 'baremetal', 'storage', 'ceph', 'vm'):\n"
            "    __import__('plugins.' + p)\n"
            "from agent.metrics import Metrics\n"
            "Metrics().observe_request('GET', '/v1/host/ping', 200, 0.001)\n"
            "print(sorted(m for m in sys.modules if m.startswith(('prometheus_client', 'xml.etree.'))))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


class _Collector:
    """A plugin's collector: no describe(), so the registry reads its names by collect()."""

    def __init__(self, name: str) -> None:
        self.name = name

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily
        g = GaugeMetricFamily(self.name, "a test gauge")
        g.add_metric([], 1.0)
        yield g


def _scrape(m: Metrics) -> str:
    from prometheus_client import generate_latest
    return generate_latest(m.registry).decode()


def test_deferred_registry_keeps_order_and_register_semantics():
    m = Metrics()
    a, b = _Collector("test_a"), _Collector("test_b")
    m.registry.register(a)
    m.registry.register(b)
    with pytest.raises(KeyError):                   # as CollectorRegistry.unregister
        m.registry.unregister(_Collector("test_c"))
    text = _scrape(m)
    # The agent's own series first, then the plugins' in the order they registered.
    assert text.index("node_agent_jobs") < text.index("test_a 1.0") < text.index("test_b 1.0")
    m.registry.unregister(a)                        # after the first scrape: the real registry's
    assert "test_a" not in _scrape(m)
    with pytest.raises(ValueError):                 # a clash is refused at once now
        m.registry.register(_Collector("test_b"))
    m.registry.register(a)
    assert "test_a 1.0" in _scrape(m)


def test_a_clash_registered_before_the_first_scrape_is_left_out(caplog):
    m = Metrics()
    m.registry.register(_Collector("test_dup"))
    m.registry.register(_Collector("test_dup"))
    assert _scrape(m).count("test_dup 1.0") == 1
    assert "left out" in caplog.text
