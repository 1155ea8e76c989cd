"""The seed notebook's BatchNorm, kept as readable pure Python: lists in, lists out.

This is the teaching reference and the slow oracle for the fast code. Its math is the
notebook's own, step by step, including the six-step hand-derived backward pass; see
docs/derivation.md for how those steps collapse into the closed form that
:mod:`batchnorm.functional` uses.
"""

from __future__ import annotations

import math


class BatchNorm:
    """Batch normalization of ``[batch_size, num_features]`` lists of floats.

    Forward (per feature j, over the batch i = 1..m):
    mean, biased variance, normalize with ``eps = 1e-5``, then ``y = gamma * x_hat + beta``.
    ``backward`` returns dL/dx and stores ``grad_gamma`` and ``grad_beta``.
    """

    def __init__(self, num_features: int):
        self.num_features = num_features
        self.eps = 1e-5
        # learnable parameters
        self.gamma = [1.0] * num_features
        self.beta = [0.0] * num_features
        # saved by forward for backward
        self.x: list[list[float]] | None = None
        self.x_normalized: list[list[float]] = []
        self.mu: list[float] = []
        self.var: list[float] = []
        self.std: list[float] = []
        self.grad_gamma: list[float] = []
        self.grad_beta: list[float] = []

    def forward(self, x: list[list[float]]) -> list[list[float]]:
        batch_size = len(x)
        self.x = x

        # 1. batch mean of each feature
        self.mu = []
        for j in range(self.num_features):
            sum_val = 0.0
            for i in range(batch_size):
                sum_val += x[i][j]
            self.mu.append(sum_val / batch_size)

        # 2. biased batch variance of each feature
        self.var = []
        for j in range(self.num_features):
            sum_squared_diff = 0.0
            for i in range(batch_size):
                diff = x[i][j] - self.mu[j]
                sum_squared_diff += diff**2
            self.var.append(sum_squared_diff / batch_size)

        # 3. standard deviation, eps keeps it away from zero
        self.std = [math.sqrt(self.var[j] + self.eps) for j in range(self.num_features)]

        # 4. normalize
        self.x_normalized = []
        for i in range(batch_size):
            row = []
            for j in range(self.num_features):
                row.append((x[i][j] - self.mu[j]) / self.std[j])
            self.x_normalized.append(row)

        # 5. scale and shift
        output = []
        for i in range(batch_size):
            row = []
            for j in range(self.num_features):
                row.append(self.gamma[j] * self.x_normalized[i][j] + self.beta[j])
            output.append(row)
        return output

    def backward(self, grad_output: list[list[float]]) -> list[list[float]]:
        if self.x is None:
            raise RuntimeError("backward() called before forward()")
        x = self.x
        batch_size = len(grad_output)

        # 1. gradients of gamma and beta
        self.grad_gamma = []
        self.grad_beta = []
        for j in range(self.num_features):
            grad_gamma_j = 0.0
            grad_beta_j = 0.0
            for i in range(batch_size):
                grad_gamma_j += grad_output[i][j] * self.x_normalized[i][j]
                grad_beta_j += grad_output[i][j]
            self.grad_gamma.append(grad_gamma_j)
            self.grad_beta.append(grad_beta_j)

        # 2. gradient of x_normalized
        grad_x_normalized = []
        for i in range(batch_size):
            grad_x_normalized.append(
                [grad_output[i][j] * self.gamma[j] for j in range(self.num_features)]
            )

        # 3. gradient of std
        grad_std = []
        for j in range(self.num_features):
            grad_std_j = 0.0
            for i in range(batch_size):
                grad_std_j += (
                    grad_x_normalized[i][j] * (x[i][j] - self.mu[j]) * (-1.0 / (self.std[j] ** 2))
                )
            grad_std.append(grad_std_j)

        # 4. gradient of var (std = sqrt(var + eps))
        grad_var = []
        for j in range(self.num_features):
            grad_var.append(grad_std[j] * 0.5 / math.sqrt(self.var[j] + self.eps))

        # 5. gradient of mu: directly through x_hat, and through var
        grad_mu = []
        for j in range(self.num_features):
            grad_mu_j = 0.0
            for i in range(batch_size):
                grad_mu_j += grad_x_normalized[i][j] * (-1.0 / self.std[j])
            grad_mu_j += (
                grad_var[j]
                * (-2.0 / batch_size)
                * sum(x[i][j] - self.mu[j] for i in range(batch_size))
            )
            grad_mu.append(grad_mu_j)

        # 6. gradient of x: through x_hat, through var and through mu
        grad_x = []
        for i in range(batch_size):
            row = []
            for j in range(self.num_features):
                grad_x_ij = grad_x_normalized[i][j] / self.std[j]
                grad_x_ij += grad_var[j] * (2.0 / batch_size) * (x[i][j] - self.mu[j])
                grad_x_ij += grad_mu[j] / batch_size
                row.append(grad_x_ij)
            grad_x.append(row)
        return grad_x
