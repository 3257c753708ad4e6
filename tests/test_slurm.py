"""SLURM: the variables of an srun task, read by the trainer."""

import pytest

from cifar10ds import slurm
from cifar10ds.errors import ConfigError


@pytest.mark.parametrize("text, hosts", [
    ("node01", ["node01"]),
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("a[1-2],b3", ["a1", "a2", "b3"]),
    ("gpu[8-10]", ["gpu8", "gpu9", "gpu10"]),  # no padding: the first number's width
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),
    ("x[001-002],y,z[9]", ["x001", "x002", "y", "z9"]),
    ("n1.cluster.org,n2.cluster.org", ["n1.cluster.org", "n2.cluster.org"]),
])
def test_node_lists_expand_as_slurm_writes_them(text, hosts):
    assert slurm.expand_nodelist(text) == hosts


@pytest.mark.parametrize("text", ["node[01-", "node]1", "node[a-b]", "node[3-1]", "n[[1]]", "a,,b", ""])
def test_a_node_list_that_is_not_one_is_refused(text):
    with pytest.raises(ValueError):
        slurm.expand_nodelist(text)


@pytest.mark.parametrize("text, counts", [("4", [4]), ("2(x3)", [2, 2, 2]), ("2(x2),1", [2, 2, 1]), ("1,3", [1, 3])])
def test_tasks_per_node(text, counts):
    assert slurm.expand_counts(text) == counts


TASK = {"SLURM_JOB_ID": "77", "SLURM_STEP_NUM_TASKS": "3", "SLURM_NTASKS": "3", "SLURM_PROCID": "2",
        "SLURM_LOCALID": "0", "SLURM_NODEID": "1", "SLURM_STEP_NODELIST": "a[1-2]", "SLURM_STEP_TASKS_PER_NODE": "2,1",
        "SLURM_JOB_NODELIST": "a[1-4]"}


def test_an_srun_task_becomes_a_rank():
    assert slurm.world(TASK) == {"RANK": "2", "WORLD_SIZE": "3", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                                 "MASTER_ADDR": "a1", "MASTER_PORT": "20077"}
    assert slurm.world({k: v for k, v in TASK.items() if k != "SLURM_STEP_NUM_TASKS"}) == {}  # a batch script


@pytest.mark.parametrize("change, message", [
    ({"SLURM_NTASKS": "4"}, "SLURM_NTASKS=4 does not match the nodes: SLURM_STEP_TASKS_PER_NODE='2,1' puts 3 tasks "
                            "on 2 node(s), SLURM_STEP_NODELIST lists 2"),
    ({"SLURM_STEP_NODELIST": "a[1-3]"}, "SLURM_STEP_NODELIST lists 3"),
    ({"SLURM_STEP_NODELIST": "a[1-"}, "SLURM_STEP_NODELIST='a[1-': cannot read this node list"),
    ({"SLURM_STEP_TASKS_PER_NODE": "2(x"}, "SLURM_STEP_TASKS_PER_NODE='2(x': cannot read the tasks per node"),
    ({"SLURM_LOCALID": "1"}, "SLURM_PROCID=2, SLURM_NODEID=1, SLURM_LOCALID=1 do not fit SLURM_NTASKS=3"),
    ({"SLURM_PROCID": "x"}, "SLURM_PROCID='x' is not a number"),
    ({"SLURM_PROCID": None}, "but SLURM_PROCID not: start the trainer with srun itself"),
])
def test_slurm_variables_that_contradict_each_other_are_one_line(change, message):
    env = {k: v for k, v in {**TASK, **change}.items() if v is not None}
    with pytest.raises(ConfigError) as e:
        slurm.world(env)
    assert message in str(e.value) and "\n" not in str(e.value)

