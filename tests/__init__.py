"""A regular package, not a namespace one: torch-fidelity 0.4.0's wheel installs a top-level `tests`
package into site-packages, which would otherwise win over this folder in `import tests.helpers`."""
