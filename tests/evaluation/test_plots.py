import io

import numpy as np
import pytest
from PIL import Image

from finetune.evaluation import cluster_order, confusion_matrix_png, most_confused_classes, row_normalize


def png_size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


def test_confusion_plot_grows_with_the_class_count():
    small = png_size(confusion_matrix_png(np.eye(10, dtype=int), [f"c{i}" for i in range(10)]))
    large = png_size(confusion_matrix_png(np.eye(225, dtype=int) * 5, [f"class {i}" for i in range(225)]))

    assert large[0] >= 225 * 14 and large[1] >= 225 * 14  # 0.14 inch per class at 100 dpi
    assert large[0] > 3 * small[0]


def test_confusion_plot_draws_class_names_with_mathtext_characters_as_text(monkeypatch):
    # Matplotlib would parse "$x^{$" as (broken) mathtext and raise ValueError.
    from finetune.evaluation import plots

    drawn = []
    real = plots.figure_png
    monkeypatch.setattr(plots, "figure_png", lambda fig, **kw: drawn.append(fig) or real(fig, **kw))
    png = confusion_matrix_png(np.array([[2, 1], [0, 3]]), ["$x^{$", "<b>&"], normalize=True)

    assert png.startswith(b"\x89PNG")
    ax = drawn[0].axes[0]
    for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
        assert [t.get_text() for t in labels] == ["$x^{$", "<b>&"]  # the names verbatim
        assert not any(t.get_parse_math() for t in labels)  # drawn as text, never parsed as mathtext


def test_row_normalize_divides_rows_by_their_totals_and_keeps_empty_rows_zero():
    np.testing.assert_allclose(row_normalize(np.array([[3, 1], [0, 0]])), [[0.75, 0.25], [0.0, 0.0]])


def test_cluster_order_puts_mutually_confused_classes_next_to_each_other():
    confusion = np.eye(8, dtype=int) * 10
    for a, b in ((0, 5), (2, 7), (3, 6)):
        confusion[a, b] = confusion[b, a] = 4

    order = list(cluster_order(confusion))

    assert sorted(order) == list(range(8))
    for a, b in ((0, 5), (2, 7), (3, 6)):
        assert abs(order.index(a) - order.index(b)) == 1


def test_most_confused_classes_collects_the_classes_of_the_largest_confusions():
    confusion = np.eye(6, dtype=int) * 10
    confusion[4, 1] = 7
    confusion[2, 3] = 5
    confusion[0, 5] = 1

    assert list(most_confused_classes(confusion, size=4)) == [1, 2, 3, 4]
    assert list(most_confused_classes(confusion, size=3)) == [1, 2, 4]


@pytest.mark.parametrize("num_classes", [1, 2])
def test_cluster_order_keeps_one_or_two_classes_in_place(num_classes):
    assert list(cluster_order(np.eye(num_classes, dtype=int))) == list(range(num_classes))
