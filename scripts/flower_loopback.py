#!/usr/bin/env python
"""A real Flower federation on this machine: one SuperLink and one SuperNode per client, each a
separate process started with Flower's own commands (each SuperNode through ``pf2lora supernode``,
Flower's SuperNode with a 0.5 s wait between empty pulls instead of its fixed 3 s, see
``--pull-interval``), the experiment submitted with ``flwr run``, and every process stopped at the
end (also on failure or Ctrl-C). By default each SuperNode runs in
process isolation, and one ``pf2lora site`` process serves them all: it imports the libraries
once, forks a task loop per SuperNode, and each loop prepares the model and its partition's data
once per run and forks each message's ClientApp from it. ``--sites fork`` starts one ``pf2lora
site`` per SuperNode instead (as separate machines would, each importing its own libraries);
``--sites subprocess`` gives Flower's default (a new process, and a new model load, per message).

    python scripts/flower_loopback.py [CONFIG] [key=value ...] --out runs/x [--work DIR]
        [--sites shared|fork|subprocess] [--pull-interval SECONDS]

The ServerApp writes the run directory ``--out``; SuperNode k holds partition k of the configured
data and keeps its own state and outputs under ``<work>/site<k>`` (as a site would on its own
disk). Logs of every process are in ``<work>/logs``. Exit status: 0 on success, 2 on bad input,
1 if the federation failed (the tail of the logs is printed).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from pf2lora.engines.flower.supernode import interval_problem
from pf2lora.parallelism import CORES_ENV, available_cores

REPO = Path(__file__).resolve().parent.parent
APP = REPO / "deploy" / "flower"
POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def wait_port(port: int, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with status {process.returncode} before opening port {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"port {port} not open after {timeout:g} s")


class Federation:
    """The processes of one loopback federation; ``stop`` ends every one of them."""

    def __init__(self, work: Path, clients: int, sites: str = "fork", pull_interval: float = 0.5) -> None:
        self.work, self.clients, self.sites, self.pull_interval = work, clients, sites, pull_interval
        self.bin = Path(sys.executable).parent
        self.env = {
            **os.environ,
            "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",  # Flower spawns its own commands
            "FLWR_HOME": str(work / "flwr_home"),  # the CLI's connections and unpacked apps; not ~/.flwr
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            # the sites' task runners (and a SuperNode's own in subprocess isolation) look for work every 0.5 s,
            # not Flower's 1 s; faster polls cost more CPU than they save where ten processes share the cores
            POLL_ENV: "0.5",
        }
        self.processes: list[subprocess.Popen] = []
        self.submitted: subprocess.Popen | None = None  # `flwr run`, once started
        (work / "logs").mkdir(parents=True, exist_ok=True)
        (work / "flwr_home").mkdir(parents=True, exist_ok=True)

    def _start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.work / "logs" / f"{name}.log", "w")  # noqa: SIM115 - lives as long as the process
        process = subprocess.Popen(
            [str(self.bin / args[0]), *args[1:]],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**self.env, **(env or {})},
            cwd=self.work,
            start_new_session=True,  # its own process group: stopping it stops what it spawned
        )
        self.processes.append(process)
        return process

    def start(self, run_config: str) -> subprocess.Popen:
        """The SuperLink, then at once the SuperNodes, their site process (``shared``: one for all,
        which imports its libraries while the SuperNodes start) and ``flwr run`` (the ServerApp
        starts while the SuperNodes connect, and waits for them); with ``fork``, each SuperNode's own
        site as its Runtime API opens. Returns the ``flwr run`` process."""
        link, *nodes = free_ports(1 + self.clients)
        site_env = {CORES_ENV: str(max(1, available_cores() // self.clients))}  # the sites share the cores
        superlink = self._start(
            "superlink",
            ["flower-superlink", "--insecure", "--disable-runtime-dependency-installation"]
            + ["--host", "127.0.0.1", "--port", str(link)],
            {POLL_ENV: "1"},  # its task runner starts one ServerApp per run: Flower's 1 s poll is enough
        )
        wait_port(link, superlink)
        supernodes = []  # started together, then waited for
        for k, port in enumerate(nodes):
            site = self.work / f"site{k}"
            node_config = f"partition-id={k} num-partitions={self.clients} dir='{site}'"
            isolation = ["--isolation", "process"] if self.sites != "subprocess" else []
            supernodes.append(
                self._start(
                    f"supernode{k}",
                    ["pf2lora", "supernode", "--pull-interval", str(self.pull_interval)]
                    + ["--insecure", "--superlink", f"127.0.0.1:{link}", *isolation]
                    + ["--node-config", node_config, "--host", "127.0.0.1", "--port", str(port)],
                )
            )
        if self.sites == "shared":  # its task loops connect once it has imported; Flower retries until then
            addresses = [a for port in nodes for a in ("--runtime-api-address", f"127.0.0.1:{port}")]
            self._start("sites", ["pf2lora", "site", *addresses, "--insecure"], site_env)
        connection = f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{link}"\n'
        (self.work / "flwr_home" / "config.toml").write_text(connection + "insecure = true\n")
        command = [str(self.bin / "flwr"), "run", str(APP), "loopback", "--run-config", run_config, "--stream"]
        log = open(self.work / "logs" / "run.log", "w")  # noqa: SIM115 - lives as long as the process
        run = self.submitted = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        for k, (port, supernode) in enumerate(zip(nodes, supernodes, strict=True)):
            wait_port(port, supernode)
            if self.sites == "fork":  # the site's task runner: the model loaded once, each message forked
                command = ["pf2lora", "site", "--runtime-api-address", f"127.0.0.1:{port}", "--insecure"]
                self._start(f"site{k}", command, site_env)
        return run

    def wait(self, run: subprocess.Popen) -> int:
        """``flwr run`` to its end; stopped, with an error naming it, if a federation process ends first."""
        try:
            while run.poll() is None:
                ended = [p for p in self.processes if p.poll() is not None]
                if ended:
                    raise RuntimeError(
                        f"{' '.join(map(str, ended[0].args[:2]))} exited with status {ended[0].returncode}"
                    )
                time.sleep(0.2)
        finally:
            if run.poll() is None:
                run.terminate()
                run.wait()
        return run.returncode

    def stop(self, grace: float = 20.0) -> list[str]:
        """SuperNodes first, the SuperLink last, each with everything it spawned (SuperExecs, ServerApp
        and ClientApp processes); whatever is left after ``grace`` seconds is killed. Returns what
        had to be killed."""
        if self.submitted is not None and self.submitted.poll() is None:  # start() failed after submitting
            self.submitted.terminate()
            self.submitted.wait()
        family = _descendants([p.pid for p in self.processes])
        for process in reversed(self.processes):
            _signal(process.pid, signal.SIGTERM, group=True)
        for pid in family:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        while time.monotonic() < deadline and any(_alive(pid) for pid in family):
            time.sleep(0.2)
        killed = []
        for pid in sorted({p.pid for p in self.processes} | family):
            if _alive(pid):
                killed.append(_command(pid))
                _signal(pid, signal.SIGKILL)
        for process in self.processes:
            process.wait()
        return killed


def _descendants(roots: list[int]) -> set[int]:
    table = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout.split()
    children: dict[int, list[int]] = {}
    for pid, ppid in zip(table[::2], table[1::2]):
        children.setdefault(int(ppid), []).append(int(pid))
    found, todo = set(), list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _signal(pid: int, sig: int, group: bool = False) -> None:
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent counts as gone)."""
    stat = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()
    return bool(stat) and not stat.startswith("Z")


def _command(pid: int) -> str:
    return subprocess.run(["ps", "-o", "args=", "-p", str(pid)], capture_output=True, text=True).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("items", nargs="*", metavar="[CONFIG] [key=value ...]")
    parser.add_argument("--out", type=Path, required=True, help="the run directory (written by the ServerApp)")
    parser.add_argument("--work", type=Path, help="logs, Flower's home and the sites' folders (default: a temp dir)")
    parser.add_argument("--force", action="store_true", help="allow writing into a non-empty --out")
    parser.add_argument(
        "--sites",
        choices=("shared", "fork", "subprocess"),
        default="shared",
        help="shared (default): every SuperNode in process isolation, served by one `pf2lora site` process that "
        "imports the libraries once and forks a task loop per SuperNode, which prepares the model once and forks "
        "each message's ClientApp; fork: one `pf2lora site` process per SuperNode, as on separate machines; "
        "subprocess: Flower's default, a new process per message",
    )
    parser.add_argument(
        "--pull-interval",
        type=float,
        default=0.5,
        metavar="SECONDS",
        help="each SuperNode's wait between pulls that find no message (default 0.5; Flower's own: 3)",
    )
    args = parser.parse_args(argv)

    from pf2lora.config import ConfigError, check_out_dir, load_config  # light: no torch before the federation starts

    config = args.items[0] if args.items and "=" not in args.items[0] else None
    overrides = args.items[1:] if config is not None else args.items
    try:
        cfg = load_config(config, overrides + ["engine=flower"])
        check_out_dir(args.out, args.force)
        if config is not None and not Path(config).is_file():
            raise ConfigError(f"config file {config} not found")
        if (problem := interval_problem(args.pull_interval)) is not None:
            raise ConfigError(problem)
    except ConfigError as err:
        print(f"flower_loopback: error: {err}", file=sys.stderr)
        return 2
    work = (args.work or Path(tempfile.mkdtemp(prefix="pf2lora-flower-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = args.out.resolve()
    experiment = work / "experiment.yaml"  # the config with the overrides applied: what the server reads
    experiment.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    run_config = f"config={_toml(str(experiment))} out={_toml(str(out))}"
    federation = Federation(work, cfg.data.num_clients, args.sites, args.pull_interval)
    started = time.perf_counter()
    status = 1
    try:
        run = federation.start(run_config)
        up = time.perf_counter() - started
        print(f"SuperLink, {cfg.data.num_clients} SuperNodes and the run started ({up:.1f} s)")
        status = federation.wait(run)
        if status == 0 and not (out / "results.json").is_file():
            status = 1
    except (RuntimeError, KeyboardInterrupt) as err:
        print(f"flower_loopback: {err}", file=sys.stderr)
    finally:
        killed = federation.stop()
        if killed:
            print(f"had to kill: {', '.join(killed)}", file=sys.stderr)
    if status != 0:
        for log in sorted((work / "logs").glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-15:]
            print(f"--- {log.name}\n" + "\n".join(tail), file=sys.stderr)
        print(f"flower_loopback: the federated run failed; logs in {work / 'logs'}", file=sys.stderr)
        return 1
    print(f"done in {time.perf_counter() - started:.1f} s; run directory {out}; sites and logs in {work}")
    return 0


def _toml(value: str) -> str:
    """A TOML literal string (flwr parses --run-config values as TOML)."""
    if "'" in value:
        raise ValueError(f"path {value!r} contains a single quote")
    return f"'{value}'"


if __name__ == "__main__":
    sys.exit(main())
