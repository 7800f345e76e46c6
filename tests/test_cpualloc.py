"""seqlm.cpualloc: the allocator settings applied at import, and their opt-outs."""
import subprocess
import sys

from seqlm import cpualloc


class FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return 1


def test_sets_thp_and_mallopt_by_default():
    env, libc = {}, FakeLibc()
    done = cpualloc.configure(env, libc)
    assert env["THP_MEM_ALLOC_ENABLE"] == "1"
    assert libc.calls == [(cpualloc.M_MMAP_THRESHOLD, 32 << 20), (cpualloc.M_TRIM_THRESHOLD, (1 << 31) - 1)]
    assert done["mallopt"]["ok"]


def test_respects_user_settings():
    env, libc = {"THP_MEM_ALLOC_ENABLE": "0", "MALLOC_MMAP_THRESHOLD_": "131072"}, FakeLibc()
    done = cpualloc.configure(env, libc)
    assert env["THP_MEM_ALLOC_ENABLE"] == "0" and libc.calls == []
    assert "skipped" in done["mallopt"]


def test_opt_out():
    env, libc = {"SEQLM_CPU_ALLOC": "0"}, FakeLibc()
    cpualloc.configure(env, libc)
    assert "THP_MEM_ALLOC_ENABLE" not in env and libc.calls == []


def test_no_mallopt_is_fine():
    env = {}
    assert "skipped" in cpualloc.configure(env, object())["mallopt"]


def _fresh(code):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "SEQLM_CPU", "THP_MEM"))}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          check=True).stdout.strip().splitlines()[-1]


def test_import_changes_nothing_but_entry_points_apply():
    """Defect 12: ``import seqlm`` changed process-wide allocator settings (mallopt, THP) of any
    host program. Now only seqlm's entry points (and an explicit opt-in) apply them."""
    assert _fresh("import os, seqlm, seqlm.cli, seqlm.train.loop; "
                  "print(seqlm.CPU_ALLOC, os.environ.get('THP_MEM_ALLOC_ENABLE'))") == "{} None"
    out = _fresh("import os, seqlm\nfrom seqlm.cli import main\n"
                 "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
                 "print(seqlm.CPU_ALLOC['mallopt']['ok'], os.environ.get('THP_MEM_ALLOC_ENABLE'))")
    assert out == "True 1"
    assert _fresh("import seqlm; print(seqlm.configure_cpu_allocator()['THP_MEM_ALLOC_ENABLE'])") == "1"


def test_values_fit_mallopts_c_int():
    """What configure sends reaches a C ``int mallopt(int, int)`` unchanged (a value past
    INT_MAX arrives truncated: 1 << 40 became 0, a trim on every free)."""
    import ctypes

    got = []
    proto = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_int)
    keep = proto(lambda param, value: got.append((param, value)) or 1)

    class Libc:
        mallopt = keep

    cpualloc.configure({}, Libc())
    assert got == [(cpualloc.M_MMAP_THRESHOLD, cpualloc.MMAP_THRESHOLD),
                   (cpualloc.M_TRIM_THRESHOLD, cpualloc.TRIM_THRESHOLD)]
    assert cpualloc.MMAP_THRESHOLD > 0 and cpualloc.TRIM_THRESHOLD > 0


def test_freed_heap_memory_is_reused_without_page_faults():
    """End to end in a fresh process: a 10 MiB tensor allocated and freed again and again
    comes back from the heap with its pages still mapped (a trim on every free, as a
    truncated trim threshold gave, made each pass fault ~500 pages in again)."""
    code = (
        "import resource, torch, seqlm\n"
        "assert seqlm.configure_cpu_allocator()['mallopt']['ok'], seqlm.CPU_ALLOC\n"
        "faults = []\n"
        "for _ in range(8):\n"
        "    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    t = torch.empty(10 << 18).fill_(1.0); del t\n"
        "    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)\n"
        "print(sum(faults[4:]), faults)\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("MALLOC_", "SEQLM_CPU"))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    later = int(out.stdout.split()[0])
    assert later < 100, out.stdout
