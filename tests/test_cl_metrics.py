import numpy as np
import pytest

from src.utils.cl_metrics import average_accuracy, average_incremental_accuracy, backward_transfer, forgetting

N = np.nan
R = np.array([
    [0.9, N, N],
    [0.5, 0.8, N],
    [0.6, 0.4, 0.7],
])


def test_by_hand():
    assert average_accuracy(R) == pytest.approx((0.6 + 0.4 + 0.7) / 3)
    assert average_incremental_accuracy(R) == pytest.approx((0.9 + (0.5 + 0.8) / 2 + (0.6 + 0.4 + 0.7) / 3) / 3)
    # forgetting: j=0: max(0.9, 0.5) - 0.6 = 0.3 ; j=1: max(0.8) - 0.4 = 0.4 -> 0.35
    assert forgetting(R) == pytest.approx(0.35)
    # BWT: (0.6-0.9 + 0.4-0.8)/2 = -0.35
    assert backward_transfer(R) == pytest.approx(-0.35)


def test_forgetting_uses_the_max_not_the_first():
    R2 = np.array([[0.5, N, N], [0.9, 0.8, N], [0.6, 0.8, 0.7]])
    assert forgetting(R2) == pytest.approx(((0.9 - 0.6) + 0.0) / 2)
    assert backward_transfer(R2) == pytest.approx(((0.6 - 0.5) + 0.0) / 2)


def test_single_increment():
    assert average_accuracy([[0.7]]) == pytest.approx(0.7)
    assert forgetting([[0.7]]) == 0.0 and backward_transfer([[0.7]]) == 0.0


def test_bad_matrix():
    with pytest.raises(ValueError, match="square"):
        average_accuracy(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="filled"):
        average_accuracy(np.array([[0.5, N], [N, 0.3]]))
