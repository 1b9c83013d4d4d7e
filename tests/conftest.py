import os

import pytest
import torch
from hypothesis import settings

# "dev" (the default) draws new examples every run; CI (.ci/run sets HYPOTHESIS_PROFILE=ci)
# draws the same ones every time, so a red CI is reproducible and never a new random draw
settings.register_profile("dev", max_examples=40, deadline=None)
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True)
settings.register_profile("long", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
