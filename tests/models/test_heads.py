import pytest
import torch
from torch import nn

from finetune.errors import FinetuneError
from finetune.models import create_head, head_options, list_heads


class SeedSpinalNet(nn.Module):
    """The seed's SpinalNet head for wide_resnet101_2 on Bird-225, written out as in its script."""

    def __init__(self, num_ftrs=2048, layer_width=1024, num_class=225):
        super().__init__()
        half = round(num_ftrs / 2)
        self.half = half

        def layer(n_in):
            return nn.Sequential(nn.Dropout(p=0.5), nn.Linear(n_in, layer_width),
                                 nn.BatchNorm1d(layer_width), nn.ReLU(inplace=True))

        self.fc_spinal_layer1 = layer(half)
        self.fc_spinal_layer2 = layer(half + layer_width)
        self.fc_spinal_layer3 = layer(half + layer_width)
        self.fc_spinal_layer4 = layer(half + layer_width)
        self.fc_out = nn.Sequential(nn.Dropout(p=0.5), nn.Linear(layer_width * 4, num_class))

    def forward(self, x):
        h = self.half
        x1 = self.fc_spinal_layer1(x[:, 0:h])
        x2 = self.fc_spinal_layer2(torch.cat([x[:, h:2 * h], x1], dim=1))
        x3 = self.fc_spinal_layer3(torch.cat([x[:, 0:h], x2], dim=1))
        x4 = self.fc_spinal_layer4(torch.cat([x[:, h:2 * h], x3], dim=1))
        x = torch.cat([x1, x2], dim=1)
        x = torch.cat([x, x3], dim=1)
        x = torch.cat([x, x4], dim=1)
        return self.fc_out(x)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_spinal_head_with_seed_configuration_has_the_seeds_parameter_count():
    head = create_head("spinal", 2048, 225)
    assert n_params(head) == 8_274_145
    assert n_params(SeedSpinalNet()) == 8_274_145


def test_spinal_head_matches_seed_forward_with_the_same_weights():
    torch.manual_seed(0)
    seed = SeedSpinalNet()
    head = create_head("spinal", 2048, 225)
    seed_layers = [seed.fc_spinal_layer1, seed.fc_spinal_layer2, seed.fc_spinal_layer3, seed.fc_spinal_layer4]
    for ours, theirs in zip(head.hidden, seed_layers):
        ours.load_state_dict(theirs.state_dict())
    head.out.load_state_dict(seed.fc_out.state_dict())
    # give BatchNorm non-trivial running statistics so eval mode really uses them
    seed.train()
    with torch.no_grad():
        seed(torch.randn(64, 2048) * 3 + 1)
    for ours, theirs in zip(head.hidden, seed_layers):
        ours.load_state_dict(theirs.state_dict())
    seed.eval()
    head.eval()
    x = torch.randn(8, 2048)
    torch.testing.assert_close(head(x), seed(x), atol=1e-6, rtol=0)


def test_spinal_head_gradients_reach_every_layer():
    head = create_head("spinal", 64, 5, width=16, layers=6, splits=3)
    head(torch.randn(4, 64)).sum().backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "in_features,options",
    [
        (1000, {"splits": 3, "width": 32}),
        (64, {"layers": 1, "width": 8}),
        (64, {"layers": 40, "width": 8}),
        (64, {"splits": 4, "batchnorm": False, "activation": "gelu"}),
    ],
)
def test_spinal_head_handles_odd_shapes(in_features, options):
    head = create_head("spinal", in_features, 7, **options).eval()
    assert head(torch.randn(1, in_features)).shape == (1, 7)
    assert len(head.hidden) == options.get("layers", 4)


def test_spinal_head_splits_indivisible_features_without_dropping_or_repeating_any():
    head = create_head("spinal", 1000, 3, splits=3, width=4, layers=3)
    # tensor_split: parts of 334, 333, 333; layer 0 sees part 0 alone, later layers add the width
    assert [layer[1].in_features for layer in head.hidden] == [334, 333 + 4, 333 + 4]


def test_mlp_head_is_the_seeds_two_layer_fc_baseline():
    head = create_head("mlp", 2048, 225)
    linears = [m for m in head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(2048, 4096), (4096, 4096), (4096, 225)]
    assert create_head("mlp", 16, 3, hidden=(8,), dropout=0.1)(torch.randn(2, 16)).shape == (2, 3)


def test_linear_head_maps_features_to_classes():
    head = create_head("linear", 16, 3, dropout=0.2)
    assert n_params(head) == 16 * 3 + 3


def test_unknown_head_and_unknown_option_give_clear_errors():
    with pytest.raises(FinetuneError, match="unknown head 'nope'"):
        create_head("nope", 8, 2)
    with pytest.raises(FinetuneError, match="head 'spinal' has no option 'depth'"):
        create_head("spinal", 8, 2, depth=3)


def test_head_registry_lists_options_with_defaults():
    assert set(list_heads()) >= {"linear", "mlp", "spinal"}
    assert head_options("spinal")["width"] == 1024
