"""Passes: apply a plan (eager module surgery, or a torch.fx graph rewrite) and freeze the rest."""

from .base import ModulePass, build_pet
from .eager import EagerPatch, PatchState, unpatch
from .freeze import Freeze
from .graph import GraphPatch

__all__ = ["ModulePass", "build_pet", "EagerPatch", "PatchState", "unpatch", "Freeze", "GraphPatch"]
