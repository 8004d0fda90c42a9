"""What every backend shares: the no-gradient check and its message, and the buckets
tensors are mixed in."""

# Why an evaluator gets no gradient, and the fix. Without this check sewa would optimise on
# zeros: every probability stays at k/K and the "selection" is arbitrary.
NO_GRADIENT = (
    "no weight received a gradient: the loss does not depend, through autograd, on the "
    "weights sewa sent (model.load_state_dict(weights) copies them and cuts the graph). "
    "In loss_fn, use torch.func.functional_call(model, weights, args); or declare a "
    "forward-only evaluator with serve(loss_fn, grad=False)"
)


def require_gradient(grads):
    """Fail loudly when no weight received a gradient (None, empty, or None for every tensor)."""
    if not grads or all(g is None for g in grads.values()):
        raise RuntimeError(NO_GRADIENT)


def buckets(names, bytes_of, limit):
    """`names` in consecutive groups of about `limit` bytes (`bytes_of(name)` each; a group
    ends once it reaches the limit), so no more than a bucket is materialised at once."""
    bucket, size = [], 0
    for n in names:
        bucket.append(n)
        size += bytes_of(n)
        if size >= limit:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket
