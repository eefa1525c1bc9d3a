"""Placement on the cluster roles of cluster.yaml degrades to free placement on a local Ray."""

from pipeline.ray_runtime import role_resources


def test_role_resources_only_when_the_cluster_has_them(ray_session):
    assert role_resources("data", 1.0) == {}  # a local Ray has no data nodes
    assert role_resources("train", 1) == {}
    assert role_resources("CPU", 2.0) == {"CPU": 2.0}  # an advertised resource is requested
