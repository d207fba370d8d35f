"""Every knob of the trainer, with its meaning. Other configs start from this one and change a few lines.

Select a variant with `--config=configs/default.py:VARIANT` (none here) and override any key with
`--config.a.b=value`, e.g. `--config.train.num_steps=2000`.
"""

import ml_collections


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  if variant:
    raise ValueError(f"configs/default.py has no variants, got {variant!r}.")
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seeds parameter init, PK sampling and augmentation.
  # Start from another run's model weights and batch statistics (not its optimizer state or step): its
  # workdir (latest checkpoint) or one checkpoint, <workdir>/checkpoints/<step>. "": the model's own init.
  config.init_from = ""

  config.data = ml_collections.ConfigDict()
  config.data.name = "glyphs"  # Dataset registered in mmsi_jax.data.pipeline.
  config.data.data_dir = "data"  # Where prepared datasets live (built there on first use).
  config.data.manual_dir = ""  # Where the official archives are, for datasets that need them.
  config.data.train_split = "train"  # Training classes.
  config.data.test_split = "test"  # Unseen test classes: query set and gallery at once.
  # Validation classes (Musgrave et al., "A Metric Learning Reality Check", ECCV 2020): with folds = k
  # >= 2 the training classes are cut into k contiguous folds; the run trains on the others and evaluates
  # fold `fold` (0-based), and the test split is never read (metrics "validation/..."). k = 2 with one
  # fold used is the half-and-half split, k = 4 the Reality Check's folds; mmsi_jax.tune sets both.
  # 0: no validation, the run trains on every training class and evaluates the test split.
  config.data.validation = ml_collections.ConfigDict()
  config.data.validation.folds = 0
  config.data.validation.fold = 0
  config.data.classes_per_batch = 16  # P of a PK batch.
  config.data.samples_per_class = 4  # K of a PK batch; batch size is P * K.
  # "pk": P classes x K images; "random": P * K images drawn at random from the split (MemVir's batches).
  config.data.sampler = "pk"
  config.data.image_size = 0  # Side of the square network input; 0: the stored images as they are.
  config.data.train_crop = "pad"  # "pad": random translation; "random_resized": random-resized crop.
  # (Or "center": no augmentation, the test transform; needs image_size > 0.)
  config.data.crop_padding = 2  # pad: reflect-pad by this many pixels and crop back (0: none).
  config.data.crop_scale = (0.16, 1.0)  # random_resized: range of the crop's area / the image's area.
  config.data.crop_ratio = (3 / 4, 4 / 3)  # random_resized: range of the crop's width / height.
  config.data.flip = False  # Random horizontal flips.
  config.data.resize_size = 256  # Test transform (image_size > 0): shorter side -> this, centre crop.
  # On the device, after the uint8 batch arrives: "symmetric" (x / 127.5 - 1), "imagenet" (RGB
  # mean/std), "caffe_bgr" (BGR 0-255 minus the Caffe mean, for BN-Inception).
  config.data.normalization = "symmetric"
  config.data.num_threads = 4  # Reader threads preparing batches (in each worker process, if any).
  config.data.num_workers = 0  # Worker processes preparing batches (grain mp_prefetch); 0: none.
  config.data.prefetch = 8  # Batches prepared ahead.
  config.data.eval_batch_size = 256  # Images per embedding call at evaluation.
  # Label noise (outliers): this fraction of the training images has its labels shuffled among them, by
  # a fixed permutation drawn with label_noise_seed, before the PK sampler groups them (0: clean).
  config.data.label_noise = 0.0
  config.data.label_noise_seed = 0
  # Which examples make up a batch (mmsi_jax/batch_policies): "pk" (P classes x K images) or
  # "smart_mining" (triplets mined from the model's embedding, refreshed every epoch; Harwood et al.,
  # ICCV 2017; with references.name="triplets" the loss sees exactly the mined triplets). The settings
  # of a policy are under its name.
  config.data.batch_policy = "pk"
  config.data.smart_mining = ml_collections.ConfigDict()  # Smart Mining (docs/METHODS.md).
  config.data.smart_mining.triplets_per_batch = 21  # T; a batch is 3T images (anchor, pos., neg.).
  # Steps between re-embeddings of the split; 0: an epoch, ceil(A / T) steps for the A anchors.
  config.data.smart_mining.refresh_every = 0
  config.data.smart_mining.start_epoch = 2  # Random triplets only in the first epochs (the paper: 2).
  config.data.smart_mining.mined_fraction = 1.0  # Share of each batch mined (the paper: 0.5 to 1).
  config.data.smart_mining.neighbors = 64  # k: each sample's list of nearest other-class samples.
  config.data.smart_mining.adaptive = True  # kappa from the controller (False: fixed at kappa).
  config.data.smart_mining.kappa = 4.0  # Initial bound factor: negatives beyond kappa d^2(a, p_NN).
  config.data.smart_mining.target_error = 0.6  # e_t: share of triplets with a non-zero loss (0.5-0.75).
  config.data.smart_mining.window = 4  # Refreshes the controller fits kappa = alpha e + beta over.
  config.data.smart_mining.step_gain = 2.0  # Undetermined fit: kappa * exp(step_gain * (e - e_t)).
  config.data.smart_mining.kappa_range = (0.05, 50.0)  # kappa is kept in this range.
  config.data.smart_mining.chunk_size = 1024  # Side of a block of the exact neighbour search.

  config.model = ml_collections.ConfigDict()
  config.model.name = "small_cnn"  # Model registered in mmsi_jax.models.
  config.model.embed_dim = 64  # D, the embedding dimension.
  config.model.widths = (32, 64, 128)  # small_cnn: channels of its conv stages.
  # Other models take their factory's arguments (mmsi_jax/models), e.g. bn_inception: pooling,
  # pretrained, frozen_bn, frozen_bn_affine, and layout ("pooled", or "osm_caa": the OSM + CAA authors'
  # branches, the embedding on inception_4e; docs/METHODS.md).
  # Activations' dtype: "float32", or "bfloat16" for mixed precision on GPUs and TPUs (parameters,
  # embeddings, similarities and losses stay float32; docs/METHODS.md, "Backbones").
  config.model.dtype = "float32"

  config.loss = ml_collections.ConfigDict()
  # A pair loss (binomial_deviance, contrastive, distance_contrastive, global_loss, lifted_structure,
  # multi_similarity, ntxent, ratio_triplet, ratio_triplet_global, triplet) or a proxy loss (arcface,
  # cosface, norm_softmax, proxy_anchor, proxy_nca) of mmsi_jax.losses.
  config.loss.name = "multi_similarity"
  config.loss.hparams = ml_collections.ConfigDict()  # Keyword arguments of the loss.
  config.loss.hparams.alpha = 2.0  # MS positive scale.
  config.loss.hparams.beta = 50.0  # MS negative scale.
  config.loss.hparams.base = 0.5  # MS similarity margin lambda.
  config.loss.hparams.epsilon = 0.1  # MS miner margin.
  config.loss.hparams.prefactor = 1.0  # MS prefactor c of c/alpha and c/beta (MMSI authors' code: 2).
  # Other losses take their own keywords here (their docstrings), e.g. proxy_nca's scale and
  # own_proxy_in_denominator (False: the paper's softmax over the other classes; True: over every
  # class, MemVir's code).

  # What the batch is compared with: the columns of S (mmsi_jax/references). A pair loss takes "batch"
  # or "xbm", a proxy loss "proxies". The settings of each component are under its name.
  config.references = ml_collections.ConfigDict()
  config.references.name = "batch"  # The batch against itself.
  config.references.xbm = ml_collections.ConfigDict()  # XBM cross-batch memory (docs/METHODS.md).
  config.references.xbm.size = 8192  # K, memory slots (one global FIFO); XBM: 55,000 on SOP.
  config.references.xbm.weight = 1.0  # lambda of L(batch, batch) + lambda * L(batch, memory).
  config.references.xbm.start_step = 0  # First step that enqueues and adds the memory term.
  config.references.proxies = ml_collections.ConfigDict()  # Learnable class proxies [C, D].
  # "kaiming_fan_out" (N(0, 2/C), Proxy-Anchor), "normal" (N(0, init_std^2)), "uniform" (U(+-1/sqrt(C))).
  config.references.proxies.init = "kaiming_fan_out"
  config.references.proxies.init_std = 1.0  # With init="normal".
  # Classes per block of the proxy loss (mmsi_jax/losses/class_blocks.py): 0 holds S [B, C] whole; b > 0
  # computes it b classes at a time, never holding more than [B, b] (SOP-sized class counts and beyond).
  config.references.proxies.class_block = 0
  # Proxies sharded over the devices (docs/USAGE.md, "Classes over devices"): 0 keeps them, their
  # optimizer state and the loss whole on every device; k > 0 pads the classes to a multiple of k
  # (padding is nobody's class) and splits them, with the optimizer state, over the mesh's devices,
  # each computing the loss over its own classes (in blocks of class_block, or whole with 0). The
  # device count must divide k (k = 8 runs, and resumes, on 1, 2, 4 or 8 devices).
  config.references.proxies.class_shards = 0
  # MemVir: the proxies plus past steps' embeddings and proxies as virtual classes (docs/METHODS.md).
  config.references.memvir = ml_collections.ConfigDict()
  config.references.memvir.init = "kaiming_fan_out"  # The proxies' initialisation, as proxies.init.
  config.references.memvir.init_std = 1.0  # With init="normal".
  config.references.memvir.num_steps = 45  # N, past steps used at once (MemVir NormSoftmax 45, ProxyNCA 20).
  config.references.memvir.step_gap = 10  # M, steps skipped between two used ones (10; ProxyNCA 25).
  config.references.memvir.warmup_steps = 0  # U, steps before the first push (MemVir: 40 epochs).
  # B, the rows of every batch (the queues' shape): follows data.classes_per_batch * samples_per_class.
  config.references.memvir.batch_size = (config.data.get_ref("classes_per_batch")
                                         * config.data.get_ref("samples_per_class"))
  # What the queues store: "float32" or "bfloat16". They take (N(M+1) + 1) x ((C + B) x D x s + 4B)
  # bytes, s = 4 or 2: with N 45, M 10, D 512, B 128, 0.23 GB on Cars (C 98), 11.6 GB on SOP (C 11,318).
  config.references.memvir.dtype = "float32"
  config.references.memvir.max_memory_gb = 8.0  # Queues larger than this are refused before training.
  # As proxies.class_block, over the (N + 1) C real and virtual classes: S [(N + 1) B, (N + 1) C] whole
  # (0) or b classes at a time (SOP: 48 GB whole at the authors' N and M).
  config.references.memvir.class_block = 0
  config.references.memvir.class_shards = 0  # As proxies.class_shards; the past proxies are split too.

  config.miner = ml_collections.ConfigDict()
  config.miner.name = "none"  # "none" (the loss's own pair weights) or a miner of mmsi_jax.mining.
  config.miner.mmsi = ml_collections.ConfigDict()  # MMSI meta-mining (docs/METHODS.md).
  config.miner.mmsi.mode = "weighting_net"  # "weighting_net" (MLP phi) or "l2rw" (authors' code).
  config.miner.mmsi.scope = "all"  # Virtual step over "all" parameters (authors) or the "head" only.
  config.miner.mmsi.virtual_lr = 0.0  # alpha of the virtual step; <= 0: the model's learning rate.
  config.miner.mmsi.validation = "train_classes"  # "train_classes" (authors) or "held_out" images.
  config.miner.mmsi.validation_classes = 10  # V: validation batch of V classes x 1 image.
  config.miner.mmsi.held_out_fraction = 0.2  # With validation="held_out": share of each class held out.
  config.miner.mmsi.memory_layout = "per_class"  # "per_class" (authors) or "global" (XBM's FIFO).
  config.miner.mmsi.memory_size = 1  # Slots per class (per_class) or in all (global).
  # No meta-weighting until the dictionary holds min_classes classes (0: every training class; the
  # authors: 98 on CUB and Cars, 1000 on SOP); counted after the batch's enqueue with enqueue="before".
  config.miner.mmsi.wait_for_coverage = True
  config.miner.mmsi.min_classes = 0
  config.miner.mmsi.warmup_steps = 0  # And none before this many steps.
  # What a step without meta-weights does: "plain" loss updates (m = 1), or "none" (authors): no change
  # to the parameters, optimizer state or BN statistics; with "none" a step whose meta loss is exactly 0
  # is skipped too, as in the authors' code.
  config.miner.mmsi.warmup_update = "plain"
  # The batch joins the dictionary "after" the meta step, or "before" it (authors: the meta loss then
  # sees this batch's embeddings).
  config.miner.mmsi.enqueue = "after"
  # The meta loss's references: the validation batch against "dictionary_and_validation" (itself and
  # the dictionary) or the "dictionary" only (authors).
  config.miner.mmsi.meta_references = "dictionary_and_validation"
  # The meta loss mines pairs as the training loss does (True), or not (False, authors: an unmined MS);
  # only losses with a `mine` argument (multi_similarity) mine.
  config.miner.mmsi.meta_mining = True
  # Where m acts: False, on the loss's pair gradients (m * dL/dS, any loss); True, inside the loss,
  # L(S; m) (the authors' MS: m S in the exponents, so that at l2rw's m = 0 the weights are the same
  # for every positive of an anchor, and negatives get ~exp(-beta / 2) of a positive's; mode "l2rw"
  # and multi_similarity only). The authors' MS also has the prefactor 2: loss.hparams.prefactor = 2.
  config.miner.mmsi.multipliers_in_loss = False
  config.miner.mmsi.net_hidden = (32, 32)  # Hidden widths of the weighting net phi.
  config.miner.mmsi.net_learning_rate = 1e-3  # Adam learning rate of phi.
  # OSM + CAA, online soft mining with class-aware attention (docs/METHODS.md): soft weights of the
  # batch's pairs, for the distance_contrastive loss (authors: margin 1.2).
  config.miner.osm_caa = ml_collections.ConfigDict()
  config.miner.osm_caa.pos_sigma = 0.8  # Positive weight exp(-d^2 / (2 pos_sigma^2)).
  config.miner.osm_caa.margin = 1.2  # alpha: negative weight max(0, alpha - d).
  config.miner.osm_caa.set_weight = 0.5  # lambda: the weights of each set (pos, neg) sum to this.
  # Class-aware attention min(a_i, a_j), a = exp(-(p - 1)^2 / (2 attention_sigma^2)), p the classifier's
  # probability of the sample's own class; False: OSM alone, without the classifier.
  config.miner.osm_caa.attention = True
  config.miner.osm_caa.attention_sigma = 0.68
  # The classifier over the pooled features, params["classifier"]: its cross-entropy, weighted per sample
  # by exp(-(p - mean)^2 / (2 sigma^2)) normalised over the batch, times classifier_weight, joins the
  # objective.
  config.miner.osm_caa.classifier_weight = 1.0
  config.miner.osm_caa.classifier_focus_mean = 0.5
  config.miner.osm_caa.classifier_focus_sigma = 0.18
  # "authors": the weights multiply the loss's mean over pairs (the 1/P of Caffe's loss); "pair_count":
  # times the B (B - 1) = 2P ordered pairs that mean runs over, cancelling it: the step trains on
  # sum_{i<j} w^_ij l_ij, 2P times the authors' loss (gradients of a plain loss's size).
  config.miner.osm_caa.scale = "authors"

  config.optim = ml_collections.ConfigDict()
  config.optim.name = "adam"  # "adam": L2 weight decay added to the gradient; "adamw": decoupled.
  config.optim.learning_rate = 1e-3  # Peak learning rate.
  config.optim.weight_decay = 5e-4  # Weight decay coefficient.
  config.optim.eps = 1e-8  # Adam's epsilon (MemVir trains with 0.01).
  config.optim.schedule = "cosine"  # "constant" or "cosine" (decay to 0 at the last step).
  config.optim.warmup_steps = 0  # Linear warm-up from 0 over this many steps.
  # Learning-rate multipliers by parameter group ("proxies") or path inside one ("model/head"); the
  # update of each parameter is scaled by the multiplier of its longest matching key (1 if none).
  config.optim.lr_mults = ml_collections.ConfigDict({"proxies": 1.0})
  # optim.name may also be "sgd": Caffe's SGD with momentum and L2 weight decay.
  config.optim.momentum = 0.9  # SGD's momentum.
  # optim.schedule may also be "step": the rate times step_factor at each of step_boundaries.
  config.optim.step_boundaries = ()
  config.optim.step_factor = 0.5

  config.train = ml_collections.ConfigDict()
  config.train.num_steps = 10_000  # Training steps (one PK batch each).
  config.train.log_every = 50  # Steps between progress lines and train/loss entries.
  config.train.eval_every = 1_000  # Steps between evaluations (and one at the end).
  config.train.checkpoint_every = 1_000  # Steps between checkpoints; a multiple of log_every.
  config.train.keep_checkpoints = 3  # Most recent checkpoints kept.

  # When machines go (docs/ARCHITECTURE.md, "Stopping"; SIGTERM and Ctrl-C save the step in flight).
  config.distributed = ml_collections.ConfigDict()
  # With --multihost: a process without a heartbeat for this long is lost, and the others stop (JAX's
  # coordination service; its own default, 100 s, keeps the survivors waiting for minutes).
  config.distributed.heartbeat_timeout_seconds = 15
  # A step's collectives or a checkpoint that make no progress for this long stop the run, naming what
  # they waited for (a lost or stuck process, a hung device); 0: wait for ever. The first step (it
  # compiles), evaluations and batch refreshes are not timed.
  config.distributed.hang_timeout_seconds = 600

  config.eval = ml_collections.ConfigDict()
  config.eval.ks = (1, 2, 4, 8)  # The K of Recall@K.
  config.eval.chunk_size = 1024  # Queries per device call of the exact top-k.
  config.eval.nmi = True  # Also NMI of k-means (K = test classes); minutes on CPU at SOP's size.
  config.eval.grid_queries = 8  # Rows (queries) of the retrieval grid PNG written per evaluation.
  config.eval.grid_results = 6  # Nearest results shown per query in that grid.
  config.eval.baseline_side = 32  # Raw-pixel baseline: test images box-downsampled to at most this side.
  # Also evaluate, at step 0 of a new run, the starting model's backbone features (L2-normalised, no
  # embedding head): the pretrained features' retrieval, "initial/<metric>" in metrics.jsonl.
  config.eval.initial_features = False
  return config
