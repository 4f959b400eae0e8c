from llamafleet import lock, preflight


def insp(offset=0.4, free=50.0, version="3.11.7", path="/usr/bin/python3.11", status="ok"):
    return {"node": {"clock_offset_s": offset, "disk_free_gb": free, "disk_path": "/srv",
                     "interpreter": {"name": "python3.11", "path": path, "version": version}},
            "stack": {"status": status}}


def run(inspections, installing=()):
    return preflight.check(lock.load_stack(None, "cpu"), inspections, min_disk_gb=10, max_clock_skew_s=5,
                           installing=set(installing))


def test_good_nodes_pass_even_when_tasks_are_slow_to_arrive():
    assert run({"a": insp(0.2), "b": insp(12.0)}) == []  # a 12 s trip under load is not a clock problem


def test_a_clock_behind_or_far_ahead_is_named():
    problems = run({"a": insp(-7.5), "b": insp(120.0), "c": insp(1.0)})
    assert problems[0].startswith("a: clock is -7.5 s off") and problems[1].startswith("b: clock is +120.0 s off")
    assert len(problems) == 2


def test_python_and_disk_are_judged_only_for_nodes_that_install():
    bad = {"a": insp(version="3.9.16", free=2.0, status="absent")}
    assert run(bad) == []
    problems = run(bad, installing=["a"])
    assert any("is Python 3.9.16" in p for p in problems) and any("only 2.0 GiB free" in p for p in problems)
    assert any("install Python" in p for p in run({"a": insp(path=None, status="absent")}, installing=["a"]))


def test_a_node_without_rsync_or_with_an_old_one_is_named_with_the_fix():
    def with_rsync(version):
        i = insp()
        i["node"]["rsync"] = version
        return i
    assert run({"a": with_rsync("3.2.7")}) == []
    problems = run({"a": with_rsync(None), "b": with_rsync("3.1.3")})
    assert problems[0].startswith("a: no rsync on the node") and "apt-get install rsync" in problems[0]
    assert problems[1].startswith("b: rsync 3.1.3 is older than 3.2.3")


def test_wheel_platforms_are_per_machine_with_the_lowest_glibc_of_its_nodes():
    def on(machine, glibc):
        i = insp()
        i["node"]["platform"] = {"machine": machine, "glibc": glibc}
        return i
    got = preflight.platforms({"b": on("x86_64", "2.36"), "a": on("x86_64", "2.31"), "g": on("aarch64", "2.35"),
                               "old": {"node": {}}})  # a node that reported no platform is left out
    assert got == {"x86_64": {"glibc": "2.31", "hosts": ["a", "b"]}, "aarch64": {"glibc": "2.35", "hosts": ["g"]}}
