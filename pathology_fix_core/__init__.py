"""The math of Metz et al. (ICML 2019), as pure jax/numpy functions on pytrees.

No learned_optimization import and no import side effects: importing this
package does not install `pathology_fix`'s compatibility layer, so the math can
be used and tested on its own.

- `variational`: Gaussian smoothing, the RP and ES per-sample gradients.
- `combine`: the per-coordinate inverse-variance merge of RP and ES.
- `objectives`: clipped (validation) meta-losses.
- `curriculum`: truncation lengths and the linear curriculum.
- `averaging`: the bias-corrected moving average of theta.
- `errors`: `InvalidArgument`, raised by argument checks, naming the parameter.

Layer 1 of docs/architecture.md; the facts these follow are docs/method.md's.
"""
