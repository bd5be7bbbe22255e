"""Node probes against fake /sys, /proc and /dev trees."""

from __future__ import annotations

from pdsupervisor.host import probes
from tests.conftest import write


def test_rdma_up_down_and_netdevs(tmp_path):
    ib = "sys/class/infiniband"
    write(tmp_path, f"{ib}/mlx5_0/ports/1/state", "4: ACTIVE\n")
    write(tmp_path, f"{ib}/mlx5_0/device/net/ens1f0/ifindex", "3")
    write(tmp_path, f"{ib}/mlx5_1/ports/1/state", "1: DOWN\n")
    write(tmp_path, f"{ib}/mlx5_1/ports/2/state", "4: ACTIVE\n")
    write(tmp_path, f"{ib}/mlx5_2/ports/1/state", "1: DOWN\n")
    devs = {d.name: d for d in probes.rdma_devices(tmp_path)}
    assert set(devs) == {"mlx5_0", "mlx5_1", "mlx5_2"}
    assert devs["mlx5_0"].up and devs["mlx5_0"].ports[0].netdevs == ["ens1f0"]
    assert devs["mlx5_0"].ports[0].state == "ACTIVE"
    assert devs["mlx5_1"].up and [p.state for p in devs["mlx5_1"].ports] == ["DOWN", "ACTIVE"]
    assert not devs["mlx5_2"].up and devs["mlx5_2"].ports[0].netdevs == []


def test_rdma_absent(tmp_path):
    assert probes.rdma_devices(tmp_path) == []


def test_hugepages_and_thp(tmp_path):
    write(tmp_path, "proc/meminfo", "MemTotal:  1000 kB\nHugePages_Total:    1024\nHugePages_Free:      512\n")
    write(tmp_path, "sys/kernel/mm/transparent_hugepage/enabled", "always [madvise] never\n")
    assert probes.hugepages(tmp_path) == (1024, 512)
    assert probes.thp_mode(tmp_path) == "madvise"


def test_hugepages_and_thp_absent(tmp_path):
    write(tmp_path, "proc/meminfo", "MemTotal:  1000 kB\n")
    assert probes.hugepages(tmp_path) == (None, None)
    assert probes.thp_mode(tmp_path) is None


def test_accelerators(tmp_path):
    assert probes.accelerators(tmp_path) == 0
    for i in range(8):
        write(tmp_path, f"dev/davinci{i}")
    write(tmp_path, "dev/davinci_manager")
    assert probes.accelerators(tmp_path) == 8
    for i in range(4):
        write(tmp_path, f"dev/accel/accel{i}")
    assert probes.accelerators(tmp_path) == 4  # /dev/accel wins


def test_nvidia(tmp_path):
    write(tmp_path, "dev/nvidiactl")
    write(tmp_path, "dev/nvidia0")
    write(tmp_path, "dev/nvidia1")
    assert probes.accelerators(tmp_path) == 2


def test_agent_facts_use_sys_root(tmp_path):
    from agent.config import AgentConfig
    from agent.daemon import Agent

    write(tmp_path, "sys/class/infiniband/mlx5_0/ports/1/state", "4: ACTIVE")
    write(tmp_path, "sys/kernel/mm/transparent_hugepage/enabled", "[always] madvise never")
    write(tmp_path, "dev/accel/accel0")
    cfg = AgentConfig(name="n1", ip="127.0.0.2", sys_root=str(tmp_path), state_dir=str(tmp_path / "state"),
                      labels={"rack": "r1"})
    facts = Agent(cfg).facts()
    assert facts.name == "n1" and facts.ip == "127.0.0.2" and facts.labels == {"rack": "r1"}
    assert facts.rdma_up() == ["mlx5_0"] and facts.thp_mode == "always" and facts.accelerators == 1
    assert facts.cpu_count > 0 and facts.memory_bytes > 0 and facts.agent_version
