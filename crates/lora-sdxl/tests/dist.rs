//! The c10d collectives of `lora_sdxl::dist` between two real ranks (two
//! threads of this process, each its own Gloo member over 127.0.0.1): the
//! gradient average, the broadcast of rank 0's weights, the sums and maxima,
//! the barrier, and a clear error when a rank is gone.

use lora_sdxl::dist::{DistEnv, ProcessGroup};
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};

fn free_port() -> u16 {
    lora_sdxl::dist::free_port().unwrap()
}

fn env(rank: usize, world: usize, port: u16, timeout: Duration) -> DistEnv {
    std::env::set_var("GLOO_SOCKET_IFNAME", "lo");
    DistEnv {
        timeout,
        ..DistEnv::local(rank, world, port)
    }
}

/// Runs `f(group)` on `world` ranks at once and returns their results in
/// rank order.
fn on_ranks<T: Send + 'static>(
    world: usize,
    f: impl Fn(ProcessGroup) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let port = free_port();
    let handles: Vec<_> = (0..world)
        .map(|rank| {
            let f = f.clone();
            std::thread::spawn(move || {
                let pg =
                    ProcessGroup::join(&env(rank, world, port, Duration::from_secs(60))).unwrap();
                f(pg)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.flatten(0, -1)).unwrap()
}

#[test]
fn gradients_are_averaged_over_the_ranks_in_buckets() {
    let out = on_ranks(2, |pg| {
        let r = pg.rank() as f32;
        // three parameters, the last without a gradient on rank 1; buckets
        // of 64 bytes split them (16 + 6 + 4 floats)
        let params: Vec<Tensor> = [vec![4, 4], vec![6], vec![2, 2]]
            .iter()
            .map(|s| {
                Tensor::zeros(s.as_slice(), (Kind::Float, tch::Device::Cpu)).set_requires_grad(true)
            })
            .collect();
        let buckets = pg.buckets(&params, 64).unwrap();
        for (i, p) in params.iter().enumerate() {
            if !(i == 2 && r == 1.0) {
                let target = (p.ones_like() * (10.0 * (i as f64 + 1.0) + f64::from(r))).detach();
                (p * &target).sum(Kind::Float).backward();
            }
        }
        pg.average_gradients(&buckets).unwrap();
        params.iter().map(|p| values(&p.grad())).collect::<Vec<_>>()
    });
    for grads in &out {
        // rank 0 gave 10, 20, 30 and rank 1 11, 21 and nothing: the means,
        // exact in fp32 (sums and halves of small integers)
        assert!(grads[0].iter().all(|&g| g == 10.5), "{:?}", grads[0]);
        assert!(grads[1].iter().all(|&g| g == 20.5), "{:?}", grads[1]);
        assert!(grads[2].iter().all(|&g| g == 15.0), "{:?}", grads[2]);
    }
}

#[test]
fn rank_0_weights_reach_every_rank_and_reductions_agree() {
    let out = on_ranks(3, |pg| {
        let r = pg.rank() as f64;
        let w = [
            Tensor::from_slice(&[r, r + 0.5]),
            Tensor::from_slice(&[r * 3.0]),
        ];
        pg.broadcast(&w, 0).unwrap();
        let s = Tensor::from_slice(&[r + 1.0]);
        pg.all_reduce_sum(&s).unwrap();
        let m = Tensor::from_slice(&[r * 7.0, -r]);
        pg.all_reduce_max(&m).unwrap();
        pg.barrier().unwrap();
        let v = |t: &Tensor| Vec::<f64>::try_from(t).unwrap();
        (v(&w[0]), v(&w[1]), v(&s), v(&m))
    });
    // exact: copies, and sums and maxima of small integers
    for (w0, w1, s, m) in out {
        assert_eq!(w0, [0.0, 0.5]);
        assert_eq!(w1, [0.0]);
        assert_eq!(s, [6.0]);
        assert_eq!(m, [14.0, 0.0]);
    }
}

#[test]
fn a_rank_that_is_gone_fails_the_others_with_an_error() {
    let port = free_port();
    let start = Instant::now();
    // rank 1 leaves only once both have joined: leaving while rank 0's side
    // of the mesh is still connecting fails rank 0's join instead (seen on
    // a loaded machine), which is not what this test is about
    let joined = std::sync::Arc::new(std::sync::Barrier::new(2));
    let both = joined.clone();
    let gone = std::thread::spawn(move || {
        let pg = ProcessGroup::join(&env(1, 2, port, Duration::from_secs(5))).unwrap();
        both.wait();
        drop(pg); // leaves the run without a word
    });
    let pg = ProcessGroup::join(&env(0, 2, port, Duration::from_secs(5))).unwrap();
    joined.wait();
    gone.join().unwrap();
    let err = pg
        .all_reduce_sum(&Tensor::from_slice(&[1.0f32]))
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("rank 0 of 2: an all-reduce failed"),
        "{err}"
    );
    assert!(err.contains("LORAKIT_DIST_TIMEOUT"), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn torchrun_variables_select_the_rank_and_bad_ones_are_named() {
    let vars = |pairs: &'static [(&'static str, &'static str)]| {
        move |k: &str| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    };
    assert_eq!(DistEnv::from_vars(vars(&[])).unwrap(), None);
    assert_eq!(
        DistEnv::from_vars(vars(&[("WORLD_SIZE", "1")])).unwrap(),
        None
    );
    let e = DistEnv::from_vars(vars(&[
        ("WORLD_SIZE", "4"),
        ("RANK", "3"),
        ("LOCAL_RANK", "1"),
        ("LOCAL_WORLD_SIZE", "2"),
        ("MASTER_ADDR", "node0"),
        ("MASTER_PORT", "29400"),
        ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ("LORAKIT_DIST_TIMEOUT", "90"),
    ]))
    .unwrap()
    .unwrap();
    assert_eq!((e.rank, e.world, e.local_rank, e.local_world), (3, 4, 1, 2));
    assert_eq!((e.master_addr.as_str(), e.master_port), ("node0", 29400));
    assert!(e.agent_store);
    assert_eq!(e.timeout, Duration::from_secs(90));
    for (bad, says) in [
        (&[("WORLD_SIZE", "2")][..], "RANK is not set"),
        (
            &[("WORLD_SIZE", "2"), ("RANK", "2")][..],
            "RANK=2 is not below WORLD_SIZE=2",
        ),
        (
            &[("WORLD_SIZE", "two")][..],
            "WORLD_SIZE=two is not a whole number",
        ),
        (
            &[("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "x")][..],
            "MASTER_PORT=x",
        ),
    ] {
        let pairs: &'static [(&'static str, &'static str)] =
            Box::leak(bad.to_vec().into_boxed_slice());
        let err = DistEnv::from_vars(vars(pairs)).unwrap_err().to_string();
        assert!(err.contains(says), "{err}");
        assert!(err.contains("--nproc"), "{err}");
    }
}
