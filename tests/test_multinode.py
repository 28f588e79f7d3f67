"""A real multi-node Ray cluster on one machine: the shared test head plus worker nodes started
by ``cluster/start_node.sh``, each in its own mount namespace with a private /tmp, so a worker
that reads or writes a path of the driver's (its CYCLEGAN_HOME, its /tmp, its working folder)
fails here as it would on a real second machine. Storage is the local S3 server, tracking a
real MLflow server with proxied artifacts; the run is submitted with ``ray job submit``.

One run carries every check, since each costs a training run: the training worker is placed on
the second node (a custom resource only the worker nodes have), Ray Data decodes on the head and
on that node, then the second node's raylet is killed mid-run (a node lost, not a process) and
the run resumes from its latest checkpoint on a third node that joined meanwhile, and ends at the
planned step. A third process then resumes the finished run for a few more steps."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.ray_fixtures import VENV_BIN, free_port, stop_cluster
from tests.test_storage_faults import _moto
from tests.test_train_cli import REPO, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.multinode]

START_NODE = REPO / "cluster" / "start_node.sh"
PLANNED = 40


class Node:
    """A worker node started by cluster/start_node.sh; ``private`` holds its /tmp and home."""

    def __init__(self, head, root: Path, name: str, resources: dict, worker_ports: int):
        self.name, self.private = name, root / name
        self.marker = f"/tmp/ray-{name}"  # in every command line of the node's processes
        env = {**os.environ, **head.env, "RAY": str(VENV_BIN / "ray")}
        ports = [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
                 f"--dashboard-agent-listen-port={free_port()}",
                 f"--dashboard-agent-grpc-port={free_port()}",
                 f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                 f"--min-worker-port={worker_ports}", f"--max-worker-port={worker_ports + 999}"]  # fmt: skip
        cmd = [str(START_NODE), head.address, str(self.private), name, "--num-cpus=2",
               f"--resources={json.dumps(resources)}", *ports]  # fmt: skip
        res = subprocess.run(
            cmd,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]

    def raylet_pid(self) -> int:
        from tests.ray_fixtures import _processes

        pids = [pid for pid, (_, cmd) in _processes().items()
                if self.marker in cmd and cmd.split(" ", 1)[0].endswith("/raylet")]  # fmt: skip
        assert len(pids) == 1, f"raylets of {self.name}: {pids}"
        return pids[0]

    def stop(self) -> None:
        stop_cluster(self.marker)

    def foreign_files(self) -> list[str]:
        """Files in the node's private folders that are not Ray's own session files."""
        found = []
        for top in (self.private / "tmp", self.private / "home"):
            for path in top.rglob("*"):
                rel = path.relative_to(self.private)
                if rel.parts[:2] == ("tmp", f"ray-{self.name}"):
                    continue  # Ray's session: logs, sockets, runtime envs, spilled objects
                if path.is_file() or path.is_symlink():
                    found.append(str(rel))
        return found


def _hold_class():
    import ray

    @ray.remote(num_cpus=0, resources={"trainer": 1})
    class Hold:
        """Holds one node's trainer slot while it lives."""

        def ready(self) -> bool:
            return True

    return Hold


def _alive_node_ids(head, resource: str) -> list[str]:
    """Alive nodes declaring ``resource`` (``node:__internal_head__``: the head)."""
    from ray.util.state import list_nodes

    alive = list_nodes(head.address, filters=[("state", "=", "ALIVE")], detail=True)
    return [n.node_id for n in alive if resource in n.resources_total]


def _checkpoints(s3_server, bucket: str, prefix: str) -> set[str]:
    # The keys alone (a listing, not a download of every object): polled while the run goes on.
    pages = _moto(s3_server).get_paginator("list_objects_v2").paginate(Bucket=bucket)
    names = set()
    for key in (o["Key"] for page in pages for o in page.get("Contents", [])):
        match = re.match(rf"{re.escape(prefix)}(checkpoint_[^/]+)/checkpoint\.pt$", key)
        if match:
            names.add(match.group(1))
    return names


def test_run_on_a_second_node_survives_losing_it(
    ray_client, s3_server, s3_env, mlflow_server, tmp_path
):
    import ray
    from ray.job_submission import JobStatus, JobSubmissionClient
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    from ray.util.state import list_actors, list_tasks

    from pipeline.scenes import write_scenes

    head = ray_client
    bucket = s3_env
    data, runs, name = f"{bucket}/scenes", f"{bucket}/runs", "multinode"
    write_scenes(data, size=48, train_a=24, train_b=16, test=4, seed=0)
    nodes = tmp_path / "nodes"
    second = Node(head, nodes, "node2", {"trainer": 1, "second_node": 1}, 30000)
    third = Node(head, nodes, "node3", {"trainer": 1, "third_node": 1}, 31000)
    try:
        second_id = wait_for(lambda: _alive_node_ids(head, "second_node"), 60, "node 2")[0]
        third_id = wait_for(lambda: _alive_node_ids(head, "third_node"), 60, "node 3")[0]
        (head_id,) = _alive_node_ids(head, "node:__internal_head__")
        # The third node waits: its trainer slot is held until the second node is lost, so
        # the run starts on the second one.
        hold = (
            _hold_class()
            .options(scheduling_strategy=NodeAffinitySchedulingStrategy(third_id, soft=False))
            .remote()
        )
        ray.get(hold.ready.remote(), timeout=60)

        # Submitted as a user would, from a folder of the driver's that no node can see.
        home = tmp_path / "driver-home"
        env_vars = {
            "CYCLEGAN_HOME": str(home),
            "RAY_AUTH_MODE": "disabled",
            "MLFLOW_TRACKING_URI": mlflow_server.uri,
            "AWS_ENDPOINT_URL_S3": os.environ["AWS_ENDPOINT_URL_S3"],
            "NO_PROXY": "127.0.0.1,localhost",
            "PYTHONUNBUFFERED": "1",
        }
        job_id = f"multinode-{uuid.uuid4().hex[:8]}"
        # The job's working folder is the driver's own (the project is installed on every
        # node); no node can see it.
        workdir = tmp_path / "job"
        workdir.mkdir()
        (workdir / "NOTE").write_text("the job's working folder\n")
        cmd = [str(VENV_BIN / "ray"), "job", "submit", "--address", head.dashboard,
               "--submission-id", job_id, "--no-wait", "--working-dir", str(workdir),
               "--runtime-env-json", json.dumps({"env_vars": env_vars}), "--",
               sys.executable, "-m", "pipeline.train", "--preset", "tiny", "--data", data,
               "--storage", runs, "--name", name, "--max-steps", str(PLANNED),
               "--set", "train.checkpoint_every=5", "--set", "train.num_to_keep=100",
               "--set", "scaling.worker_resources=trainer=1",
               "--set", "tracking.log_model=false"]  # fmt: skip
        submit = subprocess.run(
            cmd,
            cwd=tmp_path,
            env={**os.environ, **head.env},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert submit.returncode == 0, submit.stdout[-2000:] + submit.stderr[-2000:]
        jobs = JobSubmissionClient(head.dashboard)

        def job_done() -> bool:
            return jobs.get_job_status(job_id) in (
                JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED)  # fmt: skip

        prefix = f"runs/{name}/"
        wait_for(lambda: _checkpoints(s3_server, bucket[5:], prefix) or job_done(), 300,
                 "a first checkpoint in the bucket")  # fmt: skip
        assert not job_done(), jobs.get_job_logs(job_id)[-3000:]
        # The second node is lost with the worker on it; the third one is free to take over.
        ray.kill(hold)
        os.kill(second.raylet_pid(), signal.SIGKILL)
        wait_for(job_done, 420, "the job to end")
        logs = jobs.get_job_logs(job_id)
        assert jobs.get_job_status(job_id) == JobStatus.SUCCEEDED, logs[-4000:]
    finally:
        second.stop()

    try:
        # The restarted worker group continued from a checkpoint, on the third node.
        assert re.search(r"resuming from \S+ \(step [1-9]\d*\)", logs), logs[-4000:]
        assert f"done: run {name}, step {PLANNED}," in logs, logs[-3000:]
        workers = list_actors(head.address, filters=[("class_name", "=", "RayTrainWorker")], detail=True,
                              limit=10000)  # fmt: skip
        placed = {w.node_id for w in workers if w.job_id == _job_hex(jobs, job_id)}
        assert placed == {second_id, third_id}, placed
        # Ray Data decoded on the head and on the second node alike.
        tasks = list_tasks(head.address, filters=[("job_id", "=", _job_hex(jobs, job_id))], detail=True,
                           limit=10000)  # fmt: skip
        decode_nodes = {t.node_id for t in tasks if "ReadParquet" in t.name or "Map" in t.name}
        assert {head_id, second_id} <= decode_nodes, decode_nodes

        # Checkpoints in the bucket, up to the planned step; nothing in the driver's home but
        # what the driver itself keeps.
        assert len(_checkpoints(s3_server, bucket[5:], prefix)) >= PLANNED // 5
        from mlflow.tracking import MlflowClient

        client = MlflowClient(mlflow_server.uri)
        found = client.search_runs(
            [e.experiment_id for e in client.search_experiments()],
            f"attributes.run_name = '{name}'",
        )
        assert len(found) == 1 and found[0].info.status == "FINISHED"
        run_id = found[0].info.run_id
        steps = {m.step for m in client.get_metric_history(run_id, "loss/G_A")}
        assert max(steps) == PLANNED, sorted(steps)
        images = [a.path for a in client.list_artifacts(run_id, "images")]
        sample_steps = {int(p.split("+step+")[1].split("+")[0]) for p in images if "samples+" in p}
        assert len(sample_steps) >= 2, images

        # A third process (not a Ray job) resumes the finished run from the bucket.
        env = {**os.environ, **head.env, **env_vars, "CYCLEGAN_HOME": str(tmp_path / "third")}
        cmd = [sys.executable, "-m", "pipeline.train", "--resume", name, "--storage", runs,
               "--set", f"train.max_steps={PLANNED + 4}",
               "--set", "scaling.worker_resources=trainer=1"]  # fmt: skip
        more = subprocess.run(
            cmd,
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        out = more.stdout + more.stderr
        assert more.returncode == 0, out[-3000:]
        assert f"(step {PLANNED})" in out and f"step {PLANNED + 4}," in out, out[-3000:]
        steps = {m.step for m in client.get_metric_history(run_id, "loss/G_A")}
        assert max(steps) == PLANNED + 4
    finally:
        third.stop()

    # Neither worker node wrote a file of its own outside Ray's session folder.
    for node in (second, third):
        assert node.foreign_files() == [], f"{node.name} wrote {node.foreign_files()[:10]}"


def _job_hex(jobs, submission_id: str) -> str:
    """The Ray job id (hex) of a submitted job."""
    return jobs.get_job_info(submission_id).job_id
