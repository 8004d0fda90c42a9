//! How an MLP is read from tensor names: `<prefix>.weight` [out, in] with `<prefix>.bias` [out],
//! ordered by the layer index in the prefix as `nn.Sequential` saves them. Pure: names and
//! shapes in, the layer chain (or what does not fit) out.

/// One linear layer: indices into the `Params` list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layer {
    pub weight: usize,
    pub bias: usize,
    pub inputs: usize,
    pub outputs: usize,
}

/// Infer the layer chain from tensor names and shapes (names, shapes as `(name, shape)`).
/// The error says what does not fit an MLP.
pub fn infer_layers(tensors: &[(&str, &[usize])]) -> std::result::Result<Vec<Layer>, String> {
    let find = |n: &str| tensors.iter().position(|(t, _)| *t == n);
    let mut layers: Vec<(Vec<Seg>, Layer)> = Vec::new();
    let mut used = vec![false; tensors.len()];
    for (wi, (name, shape)) in tensors.iter().enumerate() {
        let Some(prefix) = name.strip_suffix(".weight") else { continue };
        if shape.len() != 2 {
            continue;
        }
        let bias_name = format!("{prefix}.bias");
        let bi = find(&bias_name).ok_or_else(|| format!("{name} has no {bias_name}"))?;
        if tensors[bi].1 != [shape[0]] {
            return Err(format!(
                "{bias_name} has shape {:?}, expected [{}] to match {name} {:?}",
                tensors[bi].1, shape[0], shape
            ));
        }
        used[wi] = true;
        used[bi] = true;
        let layer = Layer { weight: wi, bias: bi, inputs: shape[1], outputs: shape[0] };
        layers.push((natural_key(prefix), layer));
    }
    if let Some(i) = used.iter().position(|u| !u) {
        return Err(format!("tensor {} is not part of an MLP (linear weight/bias)", tensors[i].0));
    }
    if layers.is_empty() {
        return Err("no 2-D `*.weight` tensors: not an MLP".into());
    }
    layers.sort_by(|a, b| a.0.cmp(&b.0));
    let layers: Vec<Layer> = layers.into_iter().map(|(_, l)| l).collect();
    for pair in layers.windows(2) {
        if pair[1].inputs != pair[0].outputs {
            return Err(format!(
                "{} takes {} inputs but the layer before ({}) gives {}",
                tensors[pair[1].weight].0,
                pair[1].inputs,
                tensors[pair[0].weight].0,
                pair[0].outputs
            ));
        }
    }
    Ok(layers)
}

/// Name segments, numbers compared as numbers (`net.10` after `net.2`).
#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum Seg {
    Num(u64),
    Text(String),
}

fn natural_key(prefix: &str) -> Vec<Seg> {
    prefix
        .split('.')
        .map(|s| s.parse().map(Seg::Num).unwrap_or_else(|_| Seg::Text(s.to_string())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_are_ordered_by_index_not_text() {
        let t: Vec<(&str, &[usize])> = vec![
            ("net.0.bias", &[4]),
            ("net.0.weight", &[4, 3]),
            ("net.10.bias", &[2]),
            ("net.10.weight", &[2, 5]),
            ("net.2.bias", &[5]),
            ("net.2.weight", &[5, 4]),
        ];
        let l = infer_layers(&t).unwrap();
        let order: Vec<&str> = l.iter().map(|l| t[l.weight].0).collect();
        assert_eq!(order, ["net.0.weight", "net.2.weight", "net.10.weight"]);
    }

    #[test]
    fn missing_bias_and_broken_chain_are_named() {
        let t: Vec<(&str, &[usize])> = vec![("net.0.weight", &[4, 3])];
        assert!(infer_layers(&t).unwrap_err().contains("net.0.bias"));
        let t: Vec<(&str, &[usize])> = vec![
            ("a.0.bias", &[4]),
            ("a.0.weight", &[4, 3]),
            ("a.1.bias", &[2]),
            ("a.1.weight", &[2, 5]),
        ];
        assert!(infer_layers(&t).unwrap_err().contains("a.1.weight takes 5 inputs"));
    }
}
