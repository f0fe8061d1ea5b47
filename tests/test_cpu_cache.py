"""The CPU allocation cache (longrange.cpu_cache): the same numbers as torch's own allocator,
blocks reused within the live high-water mark, torch's allocator back on disable, and a clear
reason wherever it cannot be built. What swaps the process-wide allocator runs in a child."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from longrange import cpu_cache
from longrange.bench.memory import run_child

needs_compiler = pytest.mark.skipif(
    not sys.platform.startswith("linux") or cpu_cache.compiler() is None,
    reason="the CPU allocation cache needs Linux and a C++ compiler",
)


def _child(code: str) -> dict:
    """Run ``code`` in a fresh interpreter and return the JSON it prints last."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=os.environ.copy()
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_compiler
def test_a_training_step_matches_torchs_allocator():
    out = _child(
        """
        import json, torch
        from longrange import cpu_cache
        from longrange.models.registry import create_model

        def step():
            torch.manual_seed(0)
            model = create_model("sinkhorn", "tiny", max_seq_len=256)
            tokens = torch.randint(0, 256, (2, 257))
            out = model.forward_lm(tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), tokens[:, 1:].flatten())
            loss.backward()
            return loss.detach(), [p.grad.clone() for p in model.parameters()]

        plain = step()
        cpu_cache.enable(min_bytes=4096)
        cached = [step() for _ in range(3)]  # later steps run on reused blocks
        same = all(
            torch.equal(plain[0], c[0]) and all(torch.equal(a, b) for a, b in zip(plain[1], c[1]))
            for c in cached
        )
        print(json.dumps({"same": same, **cpu_cache.stats()}))
        """
    )
    assert out["same"]
    assert out["hits"] > 0 and out["mapped"] > 0


@needs_compiler
def test_blocks_are_reused_split_grown_and_held_within_the_live_high_water_mark():
    out = _child(
        """
        import json, torch
        from longrange import cpu_cache

        cpu_cache.enable(min_bytes=1 << 20, slack_bytes=0)
        mb = 1 << 18  # float32 elements in a MiB
        a = torch.empty(8 * mb); del a
        b = torch.empty(8 * mb); del b  # the same size: reused
        grown = torch.arange(12 * mb, dtype=torch.float32)  # the cached 8 MiB block, grown
        grown_ok = bool((grown[::4099] == torch.arange(0, 12 * mb, 4099, dtype=torch.float32)).all())
        del grown
        shrunk = torch.full((3 * mb,), 7.0)  # the head of the cached 12 MiB block
        shrunk_ok = bool((shrunk == 7).all())
        s1 = cpu_cache.stats()
        keep = [torch.full((k * mb,), float(k)) for k in (2, 3, 5, 7)]  # 2, 3 split off its tail
        # min and max: no temporary as large as the tensor (it would count towards the peak)
        kept_ok = all(t.min() == t.max() == k for t, k in zip(keep, (2, 3, 5, 7)))
        kept_ok = kept_ok and shrunk.min() == shrunk.max() == 7  # untouched by its tail's use
        del keep, shrunk
        s2 = cpu_cache.stats()
        cpu_cache.release()
        s3 = cpu_cache.stats()
        print(json.dumps({"ok": bool(grown_ok and shrunk_ok and kept_ok), "s1": s1, "s2": s2, "s3": s3}))
        """
    )
    mib = 1 << 20
    s1, s2, s3 = out["s1"], out["s2"], out["s3"]
    assert out["ok"]
    assert (s1["hits"], s1["split"], s1["grown"], s1["mapped"]) == (1, 1, 1, 1)
    assert s1["live_bytes"] == 3 * mib
    # 3 + 17 MiB live at the peak; with no slack, never more mapped than that
    assert s2["live_peak_bytes"] == 20 * mib and s2["mapped_peak_bytes"] <= 20 * mib
    assert s2["live_bytes"] == 0 and s2["cached_bytes"] == s2["mapped_bytes"] <= 20 * mib
    assert s3["cached_bytes"] == s3["mapped_bytes"] == 0


@needs_compiler
def test_disable_puts_torchs_allocator_back():
    out = _child(
        """
        import json, torch
        from longrange import cpu_cache

        cpu_cache.enable()
        kept = torch.ones(1 << 20)  # 4 MiB from the cache
        cpu_cache.disable()
        after = torch.ones(1 << 20)  # from torch's allocator
        s1 = cpu_cache.stats()
        total = float(kept.sum() + after.sum())
        del kept  # freed after disable: unmapped, not cached
        s2 = cpu_cache.stats()
        cpu_cache.enable()
        again = torch.ones(1 << 20)
        s3 = cpu_cache.stats()
        print(json.dumps({"total": total, "s1": s1, "s2": s2, "s3": s3, "on": cpu_cache.enabled()}))
        """
    )
    s1, s2, s3 = out["s1"], out["s2"], out["s3"]
    assert out["total"] == 2 * (1 << 20) and out["on"]
    assert s1["mapped"] == 1 and s1["live_bytes"] == 4 << 20
    assert s2["live_bytes"] == s2["cached_bytes"] == s2["mapped_bytes"] == 0 and s2["unmapped"] == 1
    assert s3["mapped"] == 2 and s3["live_bytes"] == 4 << 20


@needs_compiler
def test_the_profiler_sees_the_cached_blocks():
    out = _child(
        """
        import json, torch
        from longrange import cpu_cache

        cpu_cache.enable(min_bytes=1 << 20)
        cpu = [torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=cpu, profile_memory=True) as prof:
            x = torch.ones(4 << 20)  # 16 MiB
            del x
        usage = {e.key: e.cpu_memory_usage for e in prof.key_averages()}
        print(json.dumps({"ones": usage.get("aten::empty", 0), "freed": usage.get("[memory]", 0)}))
        """
    )
    assert out["ones"] == 16 << 20 and out["freed"] == -(16 << 20)


@needs_compiler
def test_the_library_is_built_once_per_torch_and_source(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGRANGE_CACHE_DIR", str(tmp_path))
    first = cpu_cache.build()
    stamp = first.stat().st_mtime_ns
    assert cpu_cache.build() == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no partial file left behind


def test_without_a_compiler_it_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGRANGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with pytest.raises(cpu_cache.CacheUnavailable, match=r"no C\+\+ compiler found \(.*no-such-compiler\)"):
        cpu_cache.build()


def test_a_failed_build_names_the_compilers_error(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "fake-c++"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'cache.cpp:1: error: something is wrong' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("LONGRANGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(fake))
    with pytest.raises(
        cpu_cache.CacheUnavailable, match=r"fake-c\+\+ failed: cache.cpp:1: error: something is wrong"
    ):
        cpu_cache.build()
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.parametrize("value", [-1, 1.5, True])
def test_bad_sizes_are_refused(value):
    with pytest.raises(ValueError, match="min_bytes must be a non-negative int"):
        cpu_cache.enable(min_bytes=value)


def test_train_without_the_cache_says_so_in_one_line_and_trains(tmp_path, train_cli, monkeypatch, capsys):
    monkeypatch.setenv("LONGRANGE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(cpu_cache, "_library", None)  # as if not yet built in this process
    assert train_cli("--set", "depth=1") == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "CPU allocation cache off" in line]
    missing = tmp_path / "no-such-compiler"
    assert notes == [
        f"longrange train: CPU allocation cache off (no C++ compiler found ({missing})); "
        "--no-cpu-cache hides this"
    ]
    assert train_cli("--set", "depth=1", "--name", "quiet", "--no-cpu-cache") == 0
    assert "CPU allocation cache" not in capsys.readouterr().err
    assert not cpu_cache.enabled()


@needs_compiler
def test_a_child_runs_with_its_parents_cache_setting(tmp_path, monkeypatch):
    (tmp_path / "say_cache.py").write_text(
        "from longrange import cpu_cache\nprint('on' if cpu_cache.enabled() else 'off')\n"
    )
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    assert run_child("say_cache", []) == ("off", "")
    monkeypatch.setattr(cpu_cache, "enabled", lambda: True)
    assert run_child("say_cache", []) == ("on", "")
