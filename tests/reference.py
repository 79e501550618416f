"""Float64 NumPy transcriptions of the notes' equations, B.0.1.1 to B.0.1.4.

Written from the notes (and, for Zeiler's adadelta and Nesterov's look-ahead, from the
papers), not from jstep: each function is one equation, applied leaf by leaf to a list of
NumPy arrays. `np.abs(g) ** 2` is g^2 for real g and |g|^2 for complex g.

The optimizer drivers at the end step these equations over a sequence of gradients and
return the update W_t - W_{t-1} of every step. A learning rate `eta` is a number or a
function of the step count *before* the step (t - 1), the convention of Optax schedules.
"""

from __future__ import annotations

import numpy as np


def _rate(eta, t):
    """eta_t for step t = 1, 2, ...: a constant, or a schedule read at the count t - 1."""
    return eta(t - 1) if callable(eta) else eta


def zeros(like):
    return [np.zeros_like(x) for x in like]


def full(like, value):
    return [np.full(np.shape(x), value, dtype=np.float64) for x in like]


def square(g):
    """g_t^2, elementwise; |g_t|^2 for complex g_t."""
    return [np.abs(x) ** 2 for x in g]


# ---------------------------------------------------------------- B.0.1.1 running averages


def running_average_step(C, c, gamma_t):
    """C_t = gamma_t C_{t-1} + (1 - gamma_t) c_t."""
    return [gamma_t * C_ + (1 - gamma_t) * c_ for C_, c_ in zip(C, c, strict=False)]


def moving_average_sum(cs, gamma):
    """The notes' unrolled moving average, C_T = sum_{t=1}^T gamma^(T-t) (1 - gamma) c_t."""
    T = len(cs)
    return [sum(gamma ** (T - t) * (1 - gamma) * cs[t - 1][i] for t in range(1, T + 1)) for i in range(len(cs[0]))]


def debias(C, gamma, t):
    """C_t / (1 - gamma^t): the weights of C_t sum to 1 - gamma^t (the rest is on C_0 = 0)."""
    return [C_ / (1 - gamma**t) for C_ in C]


def cumulative_gamma(t):
    """gamma_t = (t - 1) / t, the choice that makes C_t the plain mean of c_1..c_t."""
    return (t - 1) / t


def adam_m_hat_gamma(b1, t):
    """The study question of B.0.1.4: m_hat_t = gamma_t m_hat_{t-1} + (1 - gamma_t) g_t with

    gamma_t = B1 (1 - B1^(t-1)) / (1 - B1^t),  1 - gamma_t = (1 - B1) / (1 - B1^t).

    (Divide m_t = B1 m_{t-1} + (1 - B1) g_t by 1 - B1^t and write m_{t-1} =
    (1 - B1^(t-1)) m_hat_{t-1}.) gamma_1 = 0, and gamma_t -> B1 as t grows.
    """
    return b1 * (1 - b1 ** (t - 1)) / (1 - b1**t)


# ------------------------------------------------------------------------ B.0.1.2 momentum


def sgd_update(g, eta):
    """W_t = W_{t-1} - eta g_t."""
    return [-eta * x for x in g]


def velocity_step(V, g, eta, gamma):
    """V_t = gamma V_{t-1} + eta g_t (V form)."""
    return [gamma * v + eta * x for v, x in zip(V, g, strict=False)]


def velocity_update(V):
    """W_t = W_{t-1} - V_t."""
    return [-v for v in V]


def nesterov_velocity_update(V, g, eta, gamma):
    """Nesterov's look-ahead: W_t = W_{t-1} - (gamma V_t + eta g_t)."""
    return [-(gamma * v + eta * x) for v, x in zip(V, g, strict=False)]


def average_update(M, eta_prime):
    """M form: W_t = W_{t-1} - eta' M_t, with M_t the moving average of the gradients."""
    return [-eta_prime * m for m in M]


# ------------------------------------------------------------ B.0.1.3 adaptive step sizes


def squared_average_step(G, g, gamma):
    """G_t = gamma G_{t-1} + (1 - gamma) g_t^2 (the notes' "adadelta", i.e. RMSprop)."""
    return running_average_step(G, square(g), gamma)


def squared_sum_step(G, g):
    """Adagrad: G_t = G_{t-1} + g_t^2."""
    return [G_ + s for G_, s in zip(G, square(g), strict=False)]


def scaled_update(g, G, eta, eps, eps_in_sqrt=False):
    """W_t = W_{t-1} - eta g_t / (sqrt(G_t) + eps)  (the notes' equation), or, with
    eps_in_sqrt, - eta g_t / sqrt(G_t + eps)  (the notes' sentence)."""
    if eps_in_sqrt:
        return [-eta * x / np.sqrt(G_ + eps) for x, G_ in zip(g, G, strict=False)]
    return [-eta * x / (np.sqrt(G_) + eps) for x, G_ in zip(g, G, strict=False)]


def zeiler_step(Eg, Ex, g, rho, eps):
    """Zeiler's ADADELTA (2012), one step, returning (d_t, E[g^2]_t, E[dx^2]_t):

    E[g^2]_t = rho E[g^2]_{t-1} + (1 - rho) g_t^2
    d_t = sqrt(E[dx^2]_{t-1} + eps) / sqrt(E[g^2]_t + eps) g_t
    E[dx^2]_t = rho E[dx^2]_{t-1} + (1 - rho) d_t^2
    """
    Eg = squared_average_step(Eg, g, rho)
    d = [np.sqrt(ex + eps) / np.sqrt(eg + eps) * x for x, eg, ex in zip(g, Eg, Ex, strict=False)]
    Ex = squared_average_step(Ex, d, rho)
    return d, Eg, Ex


# ---------------------------------------------------------------------------- B.0.1.4 Adam


def adam_moments(m, v, g, b1, b2):
    """m_t = B1 m_{t-1} + (1 - B1) g_t,  v_t = B2 v_{t-1} + (1 - B2) g_t^2."""
    return running_average_step(m, g, b1), squared_average_step(v, g, b2)


def adam_update(m_hat, v_hat, eta, eps, eps_root):
    """W_t = W_{t-1} - eta m_hat_t / (sqrt(v_hat_t + eps_root) + eps).

    The notes: eps = 0, eps_root = their epsilon. Kingma & Ba: eps_root = 0.
    """
    return [-eta * m / (np.sqrt(v + eps_root) + eps) for m, v in zip(m_hat, v_hat, strict=False)]


def nesterov_m_hat(m, g, b1, t):
    """NAdam's look-ahead (Dozat 2016, as optax.adam(nesterov=True)):
    m_hat_t = B1 m_t / (1 - B1^(t+1)) + (1 - B1) g_t / (1 - B1^t)."""
    return [b1 * m_ / (1 - b1 ** (t + 1)) + (1 - b1) * x / (1 - b1**t) for m_, x in zip(m, g, strict=False)]


# ------------------------------------------------------------------ drivers: whole runs


def run_sgd(grads, eta):
    return [sgd_update(g, _rate(eta, t)) for t, g in enumerate(grads, start=1)]


def run_momentum(grads, eta, gamma, nesterov=False):
    V, out = zeros(grads[0]), []
    for t, g in enumerate(grads, start=1):
        eta_t = _rate(eta, t)
        V = velocity_step(V, g, eta_t, gamma)
        out.append(nesterov_velocity_update(V, g, eta_t, gamma) if nesterov else velocity_update(V))
    return out


def run_ema_momentum(grads, eta_prime, gamma):
    M, out = zeros(grads[0]), []
    for t, g in enumerate(grads, start=1):
        M = running_average_step(M, g, gamma)
        out.append(average_update(M, _rate(eta_prime, t)))
    return out


def run_running_average(values, gamma):
    """C_1..C_T; `gamma` is a number or a function of t = 1, 2, ..."""
    C, out = zeros(values[0]), []
    for t, c in enumerate(values, start=1):
        C = running_average_step(C, c, gamma(t) if callable(gamma) else gamma)
        out.append(C)
    return out


def run_rmsprop(grads, eta, gamma, eps, eps_in_sqrt=False, initial_scale=0.0):
    G, out = full(square(grads[0]), initial_scale), []
    for t, g in enumerate(grads, start=1):
        G = squared_average_step(G, g, gamma)
        out.append(scaled_update(g, G, _rate(eta, t), eps, eps_in_sqrt))
    return out


def run_adagrad(grads, eta, eps, eps_in_sqrt=False, initial_accumulator_value=0.0):
    G, out = full(square(grads[0]), initial_accumulator_value), []
    for t, g in enumerate(grads, start=1):
        G = squared_sum_step(G, g)
        out.append(scaled_update(g, G, _rate(eta, t), eps, eps_in_sqrt))
    return out


def run_adadelta(grads, eta, rho, eps):
    Eg, Ex, out = zeros(square(grads[0])), zeros(square(grads[0])), []
    for t, g in enumerate(grads, start=1):
        d, Eg, Ex = zeiler_step(Eg, Ex, g, rho, eps)
        out.append([-_rate(eta, t) * x for x in d])
    return out


def run_adam(grads, eta, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, nesterov=False):
    m, v, out = zeros(grads[0]), zeros(square(grads[0])), []
    for t, g in enumerate(grads, start=1):
        m, v = adam_moments(m, v, g, b1, b2)
        m_hat = nesterov_m_hat(m, g, b1, t) if nesterov else debias(m, b1, t)
        v_hat = debias(v, b2, t)
        out.append(adam_update(m_hat, v_hat, _rate(eta, t), eps, eps_root))
    return out
