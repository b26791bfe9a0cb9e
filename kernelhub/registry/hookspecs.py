"""Hook specifications for kernelhub plugins.

A plugin is a module or object with functions named like these, marked with
`kernelhub.hookimpl`, published under the entry-point group `kernelhub`:

    # pyproject.toml of your distribution
    [project.entry-points.kernelhub]
    my_backend = "my_package.plugin"

    # my_package/plugin.py
    import kernelhub

    @kernelhub.hookimpl
    def kernelhub_attention_backends():
        return [kernelhub.AttentionBackend(name="mine", fn=my_attention, mask_format="bool")]

kernelhub's own backends and models register through these same hooks.
"""

import pluggy

hookspec = pluggy.HookspecMarker("kernelhub")
hookimpl = pluggy.HookimplMarker("kernelhub")


@hookspec
def kernelhub_attention_backends():
    """Return an iterable of `AttentionBackend` objects this plugin provides.

    Names must be unique across plugins; a clash is reported naming both plugins,
    and the first registration is kept.
    """


@hookspec
def kernelhub_layer_kernels():
    """Return a mapping `{layer_name: {kernel_name: implementation}}`.

    An implementation is an `nn.Module` subclass whose `forward` takes what the declared
    layer's reference forward takes (`forward(self, x)` for RMSNorm; `forward(self,
    hidden_states, top_k_index, top_k_weights)` for Experts) and replaces the forward of
    layers declared with `@kernelhub.layer(layer_name)`, reading their state by
    transformers' attribute names. Its capabilities are class attributes: `devices`,
    `dtypes`, `has_backward`, `can_torch_compile`, and `supports` (features such as
    "bias" that some instances need, see `kernel_requirements()` on the layer). Users
    select it with `kernels={layer_name: kernel_name}`.
    """


@hookspec
def kernelhub_model_architectures():
    """Return a mapping `{model_type: model_class}`.

    `model_class(config_dict)` builds the model; `from_pretrained` picks the class by the
    `model_type` in config.json.
    """


@hookspec(firstresult=True)
def kernelhub_select_backend(site, candidates, device, dtype, mode):
    """Choose among backends that can all serve `site`; return a name, or None to defer.

    `candidates` is the user's ordered list of backend names that passed every check.
    Called at bind time only, never during a forward. The first non-None answer wins.
    """
