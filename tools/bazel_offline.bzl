"""Offline Bazel 4.2.3 (Debian's bazel-bootstrap) for native py_library/py_test rules.

Bazel 4.2.3 resolves toolchains by loading every toolchain registered in its built-in
WORKSPACE suffix, and test rules carry an implicit coverage tool. Three of those come from
repositories it downloads on first use (github.com / mirror.bazel.build), which fails
without network access to those hosts:

- @rules_cc       (loaded by @bazel_tools//tools/cpp, needed to resolve any toolchain)
- @rules_java     (loaded by @bazel_tools//tools/jdk, registered as toolchains too)
- @remote_coverage_tools (the implicit coverage_report_generator of every *_test)

Debian's packaged rules (bazel-rules-cc 0.0.4) are newer than Bazel 4.2.3 understands
(`use_cpp_toolchain` is missing from its @bazel_tools), so this file declares local
stand-ins: thin re-exports of the native rules Bazel 4.2.3 itself provides, exactly what
those versions of rules_cc/rules_java were. Nothing is fetched. `bazel coverage` is not
supported offline.

It also declares @tf_autoclip_python, the Python toolchain every py_test runs with: the
interpreter of the repository's `.venv` (the README's test environment), or
$TF_AUTOCLIP_BAZEL_PYTHON if set when Bazel first evaluates it.
"""

_CC_DEFS = """\
# Offline stand-in for @rules_cc (tools/bazel_offline.bzl): Bazel 4.2.3's native rules.
cc_binary = native.cc_binary
cc_import = native.cc_import
cc_library = native.cc_library
cc_proto_library = native.cc_proto_library
cc_shared_library = getattr(native, "cc_shared_library", None)
cc_test = native.cc_test
cc_toolchain = native.cc_toolchain
cc_toolchain_suite = native.cc_toolchain_suite
fdo_prefetch_hints = native.fdo_prefetch_hints
fdo_profile = native.fdo_profile
objc_import = native.objc_import
objc_library = native.objc_library
"""

_CC_BUILD = """\
package(default_visibility = ["//visibility:public"])

alias(
    name = "toolchain_type",
    actual = "@bazel_tools//tools/cpp:toolchain_type",
)
"""

_JAVA_DEFS = """\
# Offline stand-in for @rules_java (tools/bazel_offline.bzl): Bazel 4.2.3's native rules.
java_binary = native.java_binary
java_import = native.java_import
java_library = native.java_library
java_lite_proto_library = native.java_lite_proto_library
java_package_configuration = native.java_package_configuration
java_plugin = native.java_plugin
java_proto_library = native.java_proto_library
java_runtime = native.java_runtime
java_test = native.java_test
java_toolchain = native.java_toolchain
"""

_COVERAGE_BUILD = """\
# Offline stand-in for @remote_coverage_tools: `bazel coverage` is not supported offline.
package(default_visibility = ["//visibility:public"])

filegroup(name = "coverage_report_generator")

filegroup(name = "lcov_merger")
"""

_PUBLIC = 'package(default_visibility = ["//visibility:public"])\n'

def _files_repository_impl(ctx):
    ctx.file("WORKSPACE", 'workspace(name = "%s")\n' % ctx.name)
    if "BUILD" not in ctx.attr.files:
        ctx.file("BUILD", _PUBLIC)
    for path, content in ctx.attr.files.items():
        ctx.file(path, content)

_files_repository = repository_rule(
    implementation = _files_repository_impl,
    attrs = {"files": attr.string_dict()},
    local = True,
)

_PYTHON_ENV = "TF_AUTOCLIP_BAZEL_PYTHON"

def _python_repository_impl(ctx):
    workspace = ctx.path(Label("@//:WORKSPACE")).dirname
    python = ctx.os.environ.get(_PYTHON_ENV) or "%s/.venv/bin/python" % workspace
    if not ctx.path(python).exists:
        fail(("No Python environment at %s. Create it first, as the README's test command " +
              "does: python3 -m venv .venv && .venv/bin/pip install -e \".[test]\" " +
              "(or set %s to a Python that has the test dependencies).") % (python, _PYTHON_ENV))
    ctx.file("WORKSPACE", 'workspace(name = "%s")\n' % ctx.name)
    ctx.file("BUILD", """\
load("@bazel_tools//tools/python:toolchain.bzl", "py_runtime_pair")

package(default_visibility = ["//visibility:public"])

py_runtime(
    name = "python3",
    interpreter_path = "{python}",
    python_version = "PY3",
    stub_shebang = "#!{python}",
)

py_runtime_pair(
    name = "runtime_pair",
    py3_runtime = ":python3",
)

toolchain(
    name = "toolchain",
    toolchain = ":runtime_pair",
    toolchain_type = "@bazel_tools//tools/python:toolchain_type",
)
""".format(python = python))

_python_repository = repository_rule(
    implementation = _python_repository_impl,
    environ = [_PYTHON_ENV],
    local = True,
)

def offline_repositories():
    """Declares the local stand-ins and the Python toolchain repository (see above)."""
    _files_repository(
        name = "rules_cc",
        files = {"cc/BUILD": _CC_BUILD, "cc/defs.bzl": _CC_DEFS},
    )
    _files_repository(
        name = "rules_java",
        files = {"java/BUILD": _PUBLIC, "java/defs.bzl": _JAVA_DEFS},
    )
    _files_repository(
        name = "remote_coverage_tools",
        files = {"BUILD": _COVERAGE_BUILD},
    )
    _python_repository(name = "tf_autoclip_python")
