"""configure_cuda: the process-wide CUDA defaults a run sets (checked on the CPU through the flags it sets)."""
import pytest
import torch

from finetune._device import configure_cuda


def flags():
    return (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)


@pytest.fixture(autouse=True)
def restore_flags():
    before = flags()
    cpu_matmul = torch.backends.mkldnn.matmul.fp32_precision
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    assert torch.backends.mkldnn.matmul.fp32_precision == cpu_matmul, "the CPU's matmul precision changed"


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_turns_on_the_cudnn_autotuner_and_tf32(device):
    configure_cuda(torch.device(device))
    assert flags() == (True, True, True)
    # the newer per-backend settings agree, so code reading either API sees TF32
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    assert torch.backends.cudnn.conv.fp32_precision == "tf32"


def test_deterministic_recipes_keep_the_autotuner_off_but_use_tf32():
    configure_cuda(torch.device("cuda"), deterministic=True)
    assert flags() == (False, True, True)


def test_the_cpu_changes_nothing():
    configure_cuda(torch.device("cpu"))
    assert flags() == (False, False, False)
