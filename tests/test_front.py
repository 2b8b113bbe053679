import numpy as np
import pytest

from common.front import crowding_distance, hypervolume, non_dominated_sort, pareto_mask

ACC_VS_MACS = [True, False]  # maximise accuracy, minimise MACs


def _brute_force_non_dominated(points: np.ndarray, maximize: list[bool]) -> np.ndarray:
    """Reference O(n²) dominance check written as plainly as possible."""
    signs = np.where(maximize, 1.0, -1.0)
    gains = points * signs
    keep = []
    for i, candidate in enumerate(gains):
        if np.isnan(candidate).any():
            keep.append(False)
            continue
        dominated = False
        for j, other in enumerate(gains):
            if i == j or np.isnan(other).any():
                continue
            if all(o >= c for o, c in zip(other, candidate)) and any(o > c for o, c in zip(other, candidate)):
                dominated = True
                break
        keep.append(not dominated)
    return np.array(keep)


def test_pareto_mask_matches_brute_force_on_random_sets_with_ties_and_duplicates():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n_points = int(rng.integers(1, 25))
        n_objectives = int(rng.integers(2, 4))
        # Few distinct levels -> many ties; resampling rows -> exact duplicates.
        points = rng.integers(0, 4, size=(n_points, n_objectives)).astype(float)
        points = points[rng.integers(0, n_points, size=n_points)]
        if rng.random() < 0.3:
            points[rng.integers(0, n_points), rng.integers(0, n_objectives)] = np.nan
        maximize = list(rng.random(n_objectives) < 0.5)
        np.testing.assert_array_equal(pareto_mask(points, maximize), _brute_force_non_dominated(points, maximize))


def test_non_dominated_sort_fronts_are_successive_pareto_layers():
    rng = np.random.default_rng(1)
    for _ in range(100):
        points = rng.integers(0, 5, size=(int(rng.integers(1, 20)), 2)).astype(float)
        fronts = non_dominated_sort(points, ACC_VS_MACS)
        assert sorted(i for front in fronts for i in front) == list(range(len(points)))
        remaining = np.arange(len(points))
        for front in fronts:
            expected = remaining[_brute_force_non_dominated(points[remaining], ACC_VS_MACS)]
            assert front == sorted(expected.tolist())
            remaining = np.setdiff1d(remaining, front)


def test_non_dominated_sort_puts_nan_rows_in_a_last_front_of_their_own():
    points = np.array([[0.9, 100.0], [np.nan, 10.0], [0.5, 200.0], [0.8, np.nan]])
    assert non_dominated_sort(points, ACC_VS_MACS) == [[0], [2], [1, 3]]
    assert pareto_mask(points, ACC_VS_MACS).tolist() == [True, False, False, False]


def test_dimension_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="one flag per objective"):
        pareto_mask(np.zeros((3, 2)), [True])


def test_hypervolume_2d_hand_computed():
    # Accuracy (max) vs MACs (min), reference: accuracy 0, 100 MMACs.
    # Staircase: [0.9 acc @ 80] + [0.6 acc @ 20 extra strip]:
    #   0.9 * (100 - 80) = 18;  0.6 * (80 - 20) = 36  -> 54
    points = np.array([[0.9, 80.0], [0.6, 20.0], [0.5, 50.0], [0.95, 120.0]])
    # (0.5, 50) is dominated by (0.6, 20); (0.95, 120) is worse than the reference MACs.
    assert hypervolume(points, [0.0, 100.0], ACC_VS_MACS) == pytest.approx(54.0)


def test_hypervolume_2d_ignores_points_not_beating_the_reference_and_nan():
    points = np.array([[-0.1, 10.0], [0.5, 100.0], [np.nan, 1.0]])
    assert hypervolume(points, [0.0, 100.0], ACC_VS_MACS) == 0.0


def test_hypervolume_3d_hand_computed():
    # Minimise all, reference (4, 4, 4).
    # Box of (1,1,3): 3*3*1 = 9; box of (2,2,1): 2*2*3 = 12; their overlap: 2*2*1 = 4 -> 17.
    # (3,3,3) lies inside the first box and adds nothing.
    points = np.array([[1.0, 1.0, 3.0], [2.0, 2.0, 1.0], [3.0, 3.0, 3.0]])
    assert hypervolume(points, [4.0, 4.0, 4.0], [False, False, False]) == pytest.approx(17.0)


def test_hypervolume_3d_single_box_with_mixed_directions():
    # Maximise the first objective: (0.5 - 0) * (10 - 4) * (3 - 1) = 6.
    points = np.array([[0.5, 4.0, 1.0]])
    assert hypervolume(points, [0.0, 10.0, 3.0], [True, False, False]) == pytest.approx(6.0)


def test_hypervolume_rejects_unsupported_objective_counts():
    with pytest.raises(ValueError, match="2 or 3 objectives"):
        hypervolume(np.zeros((2, 4)), [1.0] * 4, [False] * 4)


def test_crowding_distance_hand_case():
    # Front sorted by accuracy: A(0.6, 10) B(0.7, 30) C(0.8, 40) D(1.0, 100)
    # Ranges: acc 0.4, MACs 90.
    # B: (0.8 - 0.6)/0.4 + (40 - 10)/90 = 0.5 + 1/3
    # C: (1.0 - 0.7)/0.4 + (100 - 30)/90 = 0.75 + 7/9
    points = np.array([[0.8, 40.0], [0.6, 10.0], [1.0, 100.0], [0.7, 30.0]])
    distances = crowding_distance(points, ACC_VS_MACS)
    assert distances[1] == np.inf and distances[2] == np.inf
    assert distances[3] == pytest.approx(0.5 + 1 / 3)
    assert distances[0] == pytest.approx(0.75 + 7 / 9)


def test_crowding_distance_small_fronts_and_nan_rows():
    assert crowding_distance(np.array([[1.0, 2.0], [2.0, 1.0]]), ACC_VS_MACS).tolist() == [np.inf, np.inf]
    distances = crowding_distance(np.array([[1.0, 2.0], [np.nan, 1.0], [2.0, 1.0]]), ACC_VS_MACS)
    assert distances.tolist() == [np.inf, 0.0, np.inf]


@pytest.mark.parametrize("n_objectives", [2, 3])
def test_hypervolume_matches_unit_cell_count_on_integer_points(n_objectives):
    # With integer coordinates the dominated region is a union of unit cells: count them.
    rng = np.random.default_rng(n_objectives)
    side = 6
    cells = np.stack(np.meshgrid(*[np.arange(side)] * n_objectives, indexing="ij"), -1).reshape(-1, n_objectives)
    for _ in range(50):
        points = rng.integers(0, side + 1, size=(int(rng.integers(1, 8)), n_objectives)).astype(float)
        covered = (points[None, :, :] <= cells[:, None, :]).all(axis=2).any(axis=1)
        expected = float(covered.sum())
        assert hypervolume(points, [side] * n_objectives, [False] * n_objectives) == pytest.approx(expected)
