# gibbs_sampler.R: a Bayesian linear regression fitted by a Gibbs sampler, written the
# way such scripts usually are: top-level code, loose variables, a `for` loop, a results
# file at the end. It knows nothing of checkpoints. gibbs_sampler_resumable.R is the same
# script with the kit added; every line added or changed there ends in "# + checkpoint".
#
#   Rscript gibbs_sampler.R [iterations] [results file]     (20000, gibbs_results.rds)
#
# The data are simulated, so it needs nothing but base R.

args <- commandArgs(trailingOnly = TRUE)
n_iter <- if (length(args) >= 1) as.integer(args[1]) else 20000L
results_file <- if (length(args) >= 2) args[2] else "gibbs_results.rds"

set.seed(20240611)

# The data: y = X beta + noise, with an intercept and five predictors.
n <- 5000
X <- cbind(1, matrix(rnorm(n * 5), n, 5))
y <- drop(X %*% c(1, 0.5, -0.3, 0, 0.8, -1.2) + rnorm(n, sd = 1.5))
p <- ncol(X)

# A fifth of the rows is held out, to score the posterior's predictions.
test <- sample(n, n %/% 5)
X_train <- X[-test, ]
y_train <- y[-test]
X_test <- X[test, ]
y_test <- y[test]

# Priors: beta ~ N(0, 100 I), sigma2 ~ inverse gamma(2, 2).
prior_precision <- diag(1 / 100, p)
a0 <- 2
b0 <- 2
XtX <- crossprod(X_train)
Xty <- drop(crossprod(X_train, y_train))

burn_in <- n_iter %/% 4
beta <- rep(0, p)
sigma2 <- 1
beta_draws <- matrix(NA_real_, n_iter, p)
sigma2_draws <- rep(NA_real_, n_iter)
test_density <- rep(0, length(y_test))  # summed over the kept draws
kept <- 0L

for (iter in 1:n_iter) {
  # beta | sigma2: normal, drawn through the Cholesky factor of its precision
  R <- chol(XtX / sigma2 + prior_precision)
  beta <- backsolve(R, forwardsolve(t(R), Xty / sigma2) + rnorm(p))
  # sigma2 | beta: inverse gamma
  residuals <- y_train - X_train %*% beta
  sigma2 <- 1 / rgamma(1, a0 + length(y_train) / 2, b0 + sum(residuals^2) / 2)

  beta_draws[iter, ] <- beta
  sigma2_draws[iter] <- sigma2
  if (iter > burn_in) {
    test_density <- test_density + dnorm(y_test, drop(X_test %*% beta), sqrt(sigma2))
    kept <- kept + 1L
  }
  if (iter %% 1000 == 0) {
    cat(sprintf("iteration %d/%d sigma2 %.4f\n", iter, n_iter, sigma2))
  }
}

kept_rows <- (burn_in + 1):n_iter
results <- list(beta_mean = colMeans(beta_draws[kept_rows, ]),
                beta_sd = apply(beta_draws[kept_rows, ], 2, sd),
                sigma2_mean = mean(sigma2_draws[kept_rows]),
                test_log_predictive_density = sum(log(test_density / kept)),
                iterations = n_iter)
saveRDS(results, results_file)
cat(sprintf("wrote %s: test log predictive density %.2f\n", results_file,
            results$test_log_predictive_density))
