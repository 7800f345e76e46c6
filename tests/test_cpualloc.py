"""seqlm.cpualloc: the allocator settings applied at import, and their opt-outs."""
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
    assert libc.calls == [(cpualloc.M_MMAP_THRESHOLD, 32 << 20), (cpualloc.M_TRIM_THRESHOLD, 1 << 40)]
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


def test_applied_on_import():
    import seqlm

    assert "THP_MEM_ALLOC_ENABLE" in seqlm.CPU_ALLOC
