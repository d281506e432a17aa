"""The local launcher: one process per rank, the plan broadcast drives them, nothing left behind."""
import psutil

from workers.engine.sampling_params import SamplingParams

from workers.launcher import LocalWorkerGroup, threads_per_rank
from workers.worker import WorkerSpec


def test_group_processes_exit_on_close_and_threads_are_shared(tiny_llama_dir):
    group = LocalWorkerGroup(WorkerSpec(str(tiny_llama_dir), tp_size=3))
    pids = group.pids
    assert len(set(pids)) == 3 and all(psutil.pid_exists(p) for p in pids)
    assert [r["num_threads"] for r in group.reports] == [threads_per_rank(3)] * 3
    group.engine.generate([[5, 6, 7]], SamplingParams(max_tokens=3, ignore_eos=True))
    group.close()
    for p in pids:
        assert not psutil.pid_exists(p) or psutil.Process(p).status() == psutil.STATUS_ZOMBIE


def test_a_killed_rank_turns_into_an_error_not_a_hang(tiny_llama_dir):
    import pytest

    from workers.errors import WorkerError

    group = LocalWorkerGroup(WorkerSpec(str(tiny_llama_dir), tp_size=2, collective_timeout_s=20))
    try:
        psutil.Process(group.pids[1]).kill()
        with pytest.raises(WorkerError):
            # rank 0 blocks in the broadcast until gloo notices the peer is gone, or dies with it
            group.engine.generate([[5, 6, 7]], SamplingParams(max_tokens=50, ignore_eos=True))
    finally:
        group.close()
    assert not any(p.is_alive() for p in group.processes)


def test_idle_followers_outlive_the_collective_timeout_and_a_stopped_rank_fails_the_step(tiny_llama_dir,
                                                                                         monkeypatch):
    """Heartbeat plans keep idle ranks inside a short collective timeout; a rank that stops
    answering (SIGSTOP: a hang, not a death) fails the next step within about that timeout. The
    decode steps read the cache in place, so rank 0 waits inside the layer stack's own all-reduce
    (workers/csrc/shm_all_reduce.h) when its peer stops."""
    import signal
    import time

    import pytest

    from workers.errors import WorkerError

    monkeypatch.setenv("TPSERVE_PAGED_DECODE", "always")
    group = LocalWorkerGroup(WorkerSpec(str(tiny_llama_dir), tp_size=2, collective_timeout_s=2))
    try:
        time.sleep(4)  # twice the timeout with no work
        out = group.engine.generate([[5, 6, 7]], SamplingParams(max_tokens=3, ignore_eos=True))[0]
        assert len(out.token_ids) == 3
        assert all(p.is_alive() for p in group.processes)
        assert group.call("layer_stack_steps") > 0
        stream = iter(group.engine.add_request([5, 6, 7], SamplingParams(max_tokens=200, ignore_eos=True)))
        next(stream), next(stream)  # the prefill's token, then a decode step's: decode steps from here
        psutil.Process(group.pids[1]).send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match="did not reach collective"):
            for _ in stream:
                pass
        assert time.monotonic() - t0 < 2 + 8
    finally:
        for p in group.pids:
            try:
                psutil.Process(p).send_signal(signal.SIGCONT)
            except psutil.NoSuchProcess:
                pass
        group.close()


def test_ranks_get_the_openmp_settings_however_the_caller_started(tiny_llama_dir, monkeypatch):
    """A script that imported torch without the settings (here: none in its environment) still
    starts ranks that read them when their own torch loads; a value the user set is kept."""
    from workers import OPENMP_ENV

    for key in OPENMP_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("GOMP_SPINCOUNT", "1234")
    with LocalWorkerGroup(WorkerSpec(str(tiny_llama_dir), tp_size=1)) as group:
        env = psutil.Process(group.pids[0]).environ()
    assert env["OMP_WAIT_POLICY"] == OPENMP_ENV["OMP_WAIT_POLICY"] and env["GOMP_SPINCOUNT"] == "1234"


def test_ranks_fork_from_the_server_and_take_the_callers_environment_as_it_is_now(tiny_llama_dir, monkeypatch):
    """Ranks are forked by the fork server (not spawned by this process), yet a switch this process
    sets after the server started reaches them, as it would a spawned rank."""
    import os

    for mode, packed in (("off", False), ("always", True)):
        monkeypatch.setenv("TPSERVE_ONEDNN", mode)
        with LocalWorkerGroup(WorkerSpec(str(tiny_llama_dir), tp_size=2)) as group:
            servers = {psutil.Process(p).ppid() for p in group.pids}
            assert len(servers) == 1 and os.getpid() not in servers
            assert psutil.Process(servers.pop()).ppid() == os.getpid()
            assert [r["onednn_layers"] > 0 for r in group.reports] == [packed, packed]
