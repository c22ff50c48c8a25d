"""The fused LoRA layer computes peft's LoRA layer: same losses and gradients for a seed, same fallbacks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from igdrec import fused_lora
from igdrec.config import SFTConfig
from igdrec.dropout import GapDropout
from igdrec.fused_lora import use_fused_lora
from igdrec.stages import sft


@pytest.fixture()
def lora_model(tiny_model_dir):
    model = sft.prepare_model(SFTConfig(model=str(tiny_model_dir), lora_dropout=0.2, seed=1), torch.device("cpu"))
    with torch.no_grad():  # peft starts B at zero, which would leave every A without a gradient
        generator = torch.Generator().manual_seed(2)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model


def loss_and_grads(model: nn.Module, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    input_ids = torch.randint(3, vocab, (3, 17), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :5] = 0  # a left-padded row
    probe = torch.randn(3, 17, vocab, generator=generator)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the dropout masks
    loss = (model(input_ids=input_ids, attention_mask=attention_mask).logits * probe).sum()
    if loss.requires_grad:
        loss.backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}
    return loss.detach(), grads


def count_fused_calls(monkeypatch) -> list[int]:
    calls = [0]
    apply = fused_lora._LoRALinear.apply

    def counting(*args):
        calls[0] += 1
        return apply(*args)

    monkeypatch.setattr(fused_lora._LoRALinear, "apply", counting)
    return calls


def test_same_losses_and_gradients_as_peft_with_gap_dropout(lora_model, monkeypatch):
    calls = count_fused_calls(monkeypatch)
    adapted = use_fused_lora(lora_model)
    assert adapted == 7 * lora_model.config.num_hidden_layers  # every linear layer of every block
    assert any(isinstance(m, GapDropout) for m in lora_model.modules())
    lora_model.train()
    fused_loss, fused_grads = loss_and_grads(lora_model, seed=7)
    assert calls[0] == adapted
    use_fused_lora(lora_model, enabled=False)
    peft_loss, peft_grads = loss_and_grads(lora_model, seed=7)
    assert calls[0] == adapted  # peft's own forward this time
    assert sorted(fused_grads) == sorted(peft_grads) and any("lora_A" in n for n in fused_grads) and not any("lora_" not in n for n in fused_grads)
    torch.testing.assert_close(fused_loss, peft_loss, rtol=1e-5, atol=1e-3)
    for name in peft_grads:
        scale = float(peft_grads[name].abs().max())
        assert scale > 0, name
        torch.testing.assert_close(fused_grads[name], peft_grads[name], rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{name}: {m}")
    # the masks matter: another seed moves the gradients far beyond that tolerance, so the equality above means equal masks
    _, other_grads = loss_and_grads(lora_model, seed=8)
    moved = [n for n in peft_grads if (other_grads[n] - peft_grads[n]).abs().max() > 1e-2 * peft_grads[n].abs().max()]
    assert len(moved) > len(peft_grads) // 2
    # evaluation draws no mask: equal to peft without dropout
    lora_model.eval()
    with torch.no_grad():
        peft_eval, _ = loss_and_grads(lora_model, seed=7)
        use_fused_lora(lora_model)
        fused_eval, _ = loss_and_grads(lora_model, seed=8)
    torch.testing.assert_close(fused_eval, peft_eval, rtol=1e-5, atol=1e-3)


def test_everything_else_takes_peft_forward(lora_model, monkeypatch):
    calls = count_fused_calls(monkeypatch)
    use_fused_lora(lora_model)
    lora_model.eval()
    with torch.no_grad():
        with lora_model.disable_adapter():
            disabled, _ = loss_and_grads(lora_model, seed=0)
        assert calls[0] == 0
        adapted, _ = loss_and_grads(lora_model, seed=0)
        assert calls[0] > 0
        use_fused_lora(lora_model, enabled=False)
        with lora_model.disable_adapter():
            peft_disabled, _ = loss_and_grads(lora_model, seed=0)
    assert torch.equal(disabled, peft_disabled) and not torch.allclose(disabled, adapted)
    # a dropout rate above the gap-drawing range keeps peft's nn.Dropout
    high = next(m for m in lora_model.modules() if isinstance(m, GapDropout))
    high.p = 0.5
    assert fused_lora._dropout_rate(high.train()) is None
    assert fused_lora._dropout_rate(nn.Identity()) == 0.0
    assert fused_lora._dropout_rate(GapDropout(0.1).eval()) == 0.0
    before = [name for name, _ in lora_model.named_parameters()]
    use_fused_lora(lora_model)
    assert [name for name, _ in lora_model.named_parameters()] == before
    use_fused_lora(lora_model, enabled=False)
    assert not any("forward" in m.__dict__ for m in lora_model.modules())


def test_compiled_blocks_run_the_fused_layer_with_the_same_masks(lora_model):
    """`--compile` compiles each decoder block; the masks' length depends on the draws, so dynamo must
    leave their drawing to eager mode rather than fail (it did, with GapDropout alone too). The "eager"
    backend traces like the real one without generating code, so this runs in seconds."""
    use_fused_lora(lora_model)
    lora_model.train()
    eager_loss, eager_grads = loss_and_grads(lora_model, seed=7)
    for module in lora_model.modules():
        if type(module).__name__.endswith("DecoderLayer"):
            module.compile(backend="eager", dynamic=True)
    compiled_loss, compiled_grads = loss_and_grads(lora_model, seed=7)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-3)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max()))


def test_a_biased_layer_and_a_strided_input_with_its_gradient():
    """Qwen-style biased projections, an input that is not contiguous, and the input's own gradient."""
    from peft import LoraConfig, get_peft_model

    from igdrec.dropout import use_gap_dropout

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(16, 12, bias=True)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    net = get_peft_model(Net(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules=["proj"]))
    with torch.no_grad():
        net.base_model.model.proj.lora_B["default"].weight.normal_()
    use_gap_dropout(net)
    net.train()
    source = torch.randn(16, 35)

    def run() -> tuple[torch.Tensor, ...]:
        x = source.clone().requires_grad_(True)
        net.zero_grad(set_to_none=True)
        torch.manual_seed(11)
        y = net(x.t())  # (35, 16) with the features strided: rows of the flattened input are not contiguous
        (y * torch.arange(y.numel(), dtype=y.dtype).view(y.shape).cos()).sum().backward()
        lora = net.base_model.model.proj
        return y.detach(), x.grad, lora.lora_A["default"].weight.grad, lora.lora_B["default"].weight.grad

    assert use_fused_lora(net) == 1
    fused = run()
    use_fused_lora(net, enabled=False)
    peft = run()
    assert (peft[0] != net.base_model.model.proj.base_layer(source.t())).any()  # the adapter counts
    for mine, theirs in zip(fused, peft):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    assert net.base_model.model.proj.base_layer.bias.grad is None
