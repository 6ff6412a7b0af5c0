"""The numbers about trained networks that the teacher page's answer key quotes, as ranges over the
networks that ``tools/check_claims.py`` trains (seeds 0-4, default and old-CPU kernels).

``OBSERVE[chapter][name] = (what it is, expression)``: after the chapter's last cell, ``check_claims``
evaluates the expression in the chapter's namespace and records the number (or None); ``--teacher``
writes the table of their medians and ranges into ``book/teacher.md``.

An expression sees the variables the chapter's code cells leave behind (exercise solutions sit in
Markdown and never run). It must not use the names ``exprs``, ``out``, ``name``, ``expr``, ``value`` or
``err`` at its top level, which are the observer's own; inside a lambda or a comprehension they are the
chapter's. None means "never" (a target not reached, a balance point below the grid).
"""

# The last step t (of 64) at which a layer's t K(t) / Omega is above 1 in the sweep entry s (0: never).
_LAST_ABOVE = ("(lambda s, n: max([t for t, k in enumerate(s.fit[n], 1) if t * k > s.omega[n]], default=0))"
               "(sweep[{p}]['sim'], shown[-1])")
# The lowest p at which the sweep's curve is best by `key` (a step count: smaller is better; None if at no p).
_FIRST_P = "min([({key}, p) for p in sweep if {key} is not None], default=(None, None))[1]"
# The first epoch of stage 1 with a validation accuracy of at least 95%.
_EPOCH_95 = "next((h['epoch'] for h in history if h['val_acc'] >= 95), None)"
# The first step at which an energy ratio reaches 1 (the SNN costs as much as the ANN).
_BREAK_EVEN = "next((t for t, r in enumerate(curve['{enc}']['ratio'], 1) if r >= 1), None)"

OBSERVE: dict[str, dict[str, tuple[str, str]]] = {
    "03_fit_curve": {
        "first_to_90": ("the $p$ of the sweep that reaches 90% first (the lowest, at a tie)",
                        _FIRST_P.format(key="sweep[p]['sim'].steps_to(90.0)")),
        "first_to_settle": ("the $p$ of the sweep that settles first (the lowest, at a tie)",
                            _FIRST_P.format(key="sweep[p]['sim'].settles_at(1.0)")),
        "above_grey_04": ("at $p = 0.4$: the spiking network's accuracy at $t = 64$ minus the RNL network's "
                          "(points; above 0: above the grey line)", "sweep[0.4]['sim'].acc[-1] - sweep[0.4]['ann_acc']"),
        "last_above_095": ("the last layer's last step above its envelope $\\Omega/t$, at $p = 0.95$ "
                           "(64: every step)",
                           _LAST_ABOVE.format(p=0.95)),
        "last_above_08": ("the same, at $p = 0.8$", _LAST_ABOVE.format(p=0.8)),
        "last_above_04": ("the same, at $p = 0.4$", _LAST_ABOVE.format(p=0.4)),
    },
    "04_rate_norm_layer": {
        "p_clip_10_middle": ("the $p$ at which the middle layer shown clips 10% of its positive inputs (the 90th "
                             "percentile of $x/m$)",
                             "float(torch.quantile((acts[shown[1]][acts[shown[1]] > 0] / running_max[shown[1]])"
                             ".double(), 0.9))"),
        "p_clip_10_last": ("the same for the last layer",
                           "float(torch.quantile((acts[shown[-1]][acts[shown[-1]] > 0] / running_max[shown[-1]])"
                           ".double(), 0.9))"),
    },
    "05_stage1": {
        "epoch_95": ("the first epoch with a validation accuracy of at least 95% (of 30)", _EPOCH_95),
        "theta_gap_95": ("at that epoch, the largest distance of a layer's threshold from its final value "
                         "(percent)",
                         "(lambda e: None if e is None else 100 * max(abs(history[e - 1]['thresholds'][n] "
                         "/ history[-1]['thresholds'][n] - 1) for n in names))(" + _EPOCH_95 + ")"),
    },
    "06_stage2": {
        "balance_0001": ("the balance point at $\\lambda = 0.001$, the slider's smallest (stage 1: $p = 0.95$)",
                         "balance_point(0.001)"),
        "balance_lo": ("the balance point at the profile's smallest $\\lambda$, 0.005", "p_star[lam_lo]"),
        "balance_hi": ("the balance point at the profile's largest $\\lambda$, 0.05", "p_star[lam_hi]"),
    },
    "07_conversion": {
        "first_to_90": ("the $p$ of the sweep whose red marker (90%) comes first (the lowest, at a tie)",
                        _FIRST_P.format(key="sweep[p]['sim'].steps_to(90.0)")),
        "first_to_settle": ("the $p$ of the sweep that settles first (the lowest, at a tie)",
                            _FIRST_P.format(key="sweep[p]['sim'].settles_at(1.0)")),
        "best_at_64": ("the $p$ of the sweep most accurate at $t = 64$ (the lowest, at a tie)",
                       "max(sweep, key=lambda p: sweep[p]['sim'].acc[-1])"),
        "above_grey_05": ("at $p = 0.5$: the spiking network's accuracy at $t = 64$ minus the RNL network's "
                          "(points; above 0: above the grey line)", "sweep[0.5]['sim'].acc[-1] - sweep[0.5]['ann_acc']"),
        "peak_last": ("the largest $t\\,K(t)/\\Omega$ of the last layer shown, over every $p$ and $t$",
                      "max(max(t * k for t, k in enumerate(sweep[p]['sim'].fit[shown[-1]], 1)) "
                      "/ sweep[p]['sim'].omega[shown[-1]] for p in sweep)"),
        "last_above": ("the last step at which the middle or the last layer shown is above its envelope, "
                       "latest over every $p$ (0: never)",
                       "max(max([t for t, k in enumerate(sweep[p]['sim'].fit[n], 1) if t * k > "
                       "sweep[p]['sim'].omega[n]], default=0) for p in sweep for n in shown[1:])"),
    },
    "08_spikingjelly": {
        "t_target": ("the first step at which the stage-2 network reaches 95% (test split)", "t_hit"),
        "ratio_target": ("its energy at that step, as a share of the ANN's (encoder once)",
                         "None if t_hit is None else curve['once']['ratio'][t_hit - 1]"),
        "slope": ("the ratio's rise per step from that step to $t = 128$ (encoder once)",
                  "None if t_hit is None or t_hit >= T else "
                  "(curve['once']['ratio'][T - 1] - curve['once']['ratio'][t_hit - 1]) / (T - t_hit)"),
        "break_even_once": ("the break-even step, encoder once (Exercise 8.2)", _BREAK_EVEN.format(enc="once")),
        "break_even_every": ("the break-even step, encoder every step (Exercise 8.2)",
                             _BREAK_EVEN.format(enc="every_step")),
        "margin_once": ("the steps from reaching 95% to break-even, encoder once",
                        "(lambda b: None if t_hit is None or b is None else b - t_hit)(" + _BREAK_EVEN.format(enc="once")
                        + ")"),
    },
}
