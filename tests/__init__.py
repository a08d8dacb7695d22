"""The test suite. A regular package on purpose: torch-fidelity installs a top-level `tests`
package into site-packages, which would shadow a namespace package of this name."""
