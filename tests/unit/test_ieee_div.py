"""quant/ieee.div_rn: the correctly rounded fp32 quotient (float64 division rounded once is exact for fp32
operands), which the reciprocal product that CUDA uses for `tensor / python_float` is not."""
import pytest
import torch

from megatron_longlive.quant.ieee import div_rn

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("c", [448.0, 2688.0, 7.0])
def test_div_rn_is_the_correctly_rounded_quotient(device, c):
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(200_000, generator=g) * 2.0 ** torch.randint(-30, 30, (200_000,), generator=g)).to(device)
    want = (x.double() / c).float()
    assert torch.equal(div_rn(x, c), want)
    assert div_rn(x[7].reshape(()), c).item() == want[7].item()       # 0-dim (a tensor amax) too
    # the reciprocal product differs in the last bit for some inputs: why the helper exists
    assert (x * torch.tensor(1.0 / c, dtype=torch.float32) != want).sum() > 0
