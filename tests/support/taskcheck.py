"""Independent recomputations of each task rule, written from the task definitions (plain Python
loops over full sequences), shared by the tests/tasks/test_task_*.py files."""
import torch


def full_sequences(x, y):
    """inputs, targets (B, L) -> the sampled sequences (B, L+1); checks targets = next token."""
    assert x.shape == y.shape and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1]), "targets must be the inputs shifted by one"
    return torch.cat([x, y[:, -1:]], 1)


def expected_mask_lagged(s, n_start):
    # full positions t >= n_start are ruled; mask index i scores full position i+1
    B, L1 = s.shape
    return torch.tensor([[i + 1 >= n_start for i in range(L1 - 1)]] * B)


def check_lagged_sum(task, x, y, m):
    s = full_sequences(x, y).tolist()
    assert torch.equal(m, expected_mask_lagged(torch.tensor(s), task.n_start))
    for row in s:
        for t in range(task.n_start, len(row)):
            assert row[t] == sum(row[t - lag] for lag in task.lags) % task.V, (row, t)


def check_lagged_digits(task, x, y, m):
    s = full_sequences(x, y).tolist()
    assert torch.equal(m, expected_mask_lagged(torch.tensor(s), task.n_start))
    b = task.base
    for row in s:
        for t in range(task.n_start, len(row)):
            for j, lag in enumerate(task.lags):
                assert (row[t] // b**j) % b == (row[t - lag] // b**j) % b, (row, t, j)


def check_pointer(task, x, y, m):
    """Scored positions follow the rule; positions before T are unscored. Returns (#unscored
    ruled positions, #of those where the rule fails) to let tests check the fresh-token rate."""
    s = full_sequences(x, y).tolist()
    fresh = fresh_break = 0
    for row, mrow in zip(s, m.tolist()):
        for i, scored in enumerate(mrow):
            t = i + 1
            if t < task.T:
                assert not scored, (row, t)
                continue
            ruled = row[t - 1 - (row[t - 1] % task.T)]
            if scored:
                assert row[t] == ruled, (row, t)
            else:
                fresh += 1
                fresh_break += row[t] != ruled
    return fresh, fresh_break


def check_recall(task, x, y, m):
    s = full_sequences(x, y).tolist()
    K, nk = task.K, task.n_keys
    for row, mrow in zip(s, m.tolist()):
        keys, vals = row[0 : 2 * K : 2], row[1 : 2 * K : 2]
        assert len(set(keys)) == K and all(1 <= k <= nk for k in keys), row
        assert all(nk + 1 <= v <= nk + task.n_values for v in vals), row
        table = dict(zip(keys, vals))
        assert not any(mrow[: 2 * K]), "nothing in the key-value section is scored"
        queried = []
        t = 2 * K
        while t < len(row):  # the query section: filler, or a key followed by its value
            if row[t] == 0:
                assert t == 0 or not mrow[t - 1], (row, t)
                t += 1
                continue
            assert row[t] in table, (row, t)
            assert row[t + 1] == table[row[t]], (row, t)
            assert mrow[t] and (t == 0 or not mrow[t - 1]), (row, t)
            queried.append(row[t])
            t += 2
        assert sum(mrow) == len(queried) == task.Q
        if task.Q <= K:
            assert len(set(queried)) == task.Q


CHECKS = {"lagged": check_lagged_sum, "lagged_digits": check_lagged_digits, "pointer": check_pointer,
          "recall": check_recall}
