"""The device mesh ``(dp_replicate, dp_shard, cp)`` and its named, flattened views."""

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of data and context parallelism; ``dp_shard = -1`` takes what is left."""

    dp_replicate: int
    dp_shard: int
    cp: int
    world_size: int

    @classmethod
    def resolve(cls, world_size: int, dp_replicate: int = 1, dp_shard: int = -1, cp: int = 1) -> "ParallelDims":
        """Fill in ``dp_shard = -1`` and check that the degrees multiply to ``world_size``.

        Raises:
            ValueError: naming the degrees and the fix.
        """
        for name, value in (("dp_replicate_degree", dp_replicate), ("cp_degree", cp)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if dp_shard == -1:
            if world_size % (dp_replicate * cp):
                raise ValueError(
                    f"world size {world_size} is not divisible by dp_replicate_degree * cp_degree = "
                    f"{dp_replicate} * {cp}; change the degrees or the number of processes"
                )
            dp_shard = world_size // (dp_replicate * cp)
        if dp_shard < 1 or dp_replicate * dp_shard * cp != world_size:
            raise ValueError(
                f"dp_replicate_degree * dp_shard_degree * cp_degree = {dp_replicate} * {dp_shard} * {cp} "
                f"must equal the world size {world_size}; set dp_shard_degree=-1 to use the remaining ranks"
            )
        return cls(dp_replicate, dp_shard, cp, world_size)

    @property
    def dp(self) -> int:
        """Number of data-parallel groups (distinct samples per micro-step)."""
        return self.dp_replicate * self.dp_shard


@dataclass(frozen=True)
class ParallelMeshes:
    """The 3-D mesh and its named views; flattened views are kept here (torch asks that
    they be book-kept rather than sliced from the root mesh again)."""

    world: DeviceMesh  # ("dp_replicate", "dp_shard", "cp")
    dp: DeviceMesh  # data loading: dp_replicate x dp_shard (cp ranks of a group share a sample)
    dp_shard_cp: DeviceMesh  # FSDP sharding
    dp_cp: DeviceMesh  # every rank: the loss's token count is reduced over it

    @property
    def cp(self) -> DeviceMesh:
        return self.world["cp"]


def build_mesh(dims: ParallelDims, device_type: str) -> ParallelMeshes:
    """The mesh ``("dp_replicate", "dp_shard", "cp")`` and its flattened views."""
    world = init_device_mesh(
        device_type, (dims.dp_replicate, dims.dp_shard, dims.cp), mesh_dim_names=("dp_replicate", "dp_shard", "cp")
    )
    return ParallelMeshes(
        world=world,
        dp=world["dp_replicate", "dp_shard"]._flatten("dp"),
        dp_shard_cp=world["dp_shard", "cp"]._flatten("dp_shard_cp"),
        dp_cp=world["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp"),
    )
