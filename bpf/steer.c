// SPDX-License-Identifier: GPL-2.0
/*
 * Reference only: the C equivalent of the program encoded by src/steering.rs (see
 * bpf/steer.golden). Not built; Hatchery has no C toolchain dependency. It would build
 * with `clang -O2 -target bpf -c steer.c` against libbpf's bpf_helpers.h, and the
 * instruction sequence clang emits may differ in register choice from the hand encoding.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

/* cfg[0] == 0: let the kernel pick by hash; cfg[0] == k + 1: select socks[k].
 * cfg[1] == 0: no probe; else (port << 16) | (k + 1): a connection whose TCP source port
 * is `port` (its two header bytes read as a native u16) selects socks[k] instead.
 * cfg[2] == 0: no canary; else (t << 16) | (k + 1): a connection whose flow hash has its
 * low 16 bits below t selects socks[k] (a canary's share of t / 65536). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 3);
	__type(key, __u32);
	__type(value, __u32);
} cfg SEC(".maps");

/* Two slots, used alternately by Steering::steer_to. */
struct {
	__uint(type, BPF_MAP_TYPE_REUSEPORT_SOCKARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} socks SEC(".maps");

/* Loaded with expected_attach_type BPF_SK_REUSEPORT_SELECT_OR_MIGRATE where the kernel
 * has it (5.14), so it also runs for requests migrating off a closing listener
 * (ctx->migrating_sk set) and selects the same serving listener. */
SEC("sk_reuseport/migrate")
int steer(struct sk_reuseport_md *ctx)
{
	__u8 *data = ctx->data;
	__u8 *data_end = ctx->data_end;
	__u32 key, *entry, slot1 = 0;

	/* The agent's probe of a generation that is not serving yet. A migrating request
	 * without a packet (data == data_end) skips this. */
	if (data + 2 <= data_end) {
		__u16 sport = *(__u16 *)data; /* the TCP header starts at data */

		key = 1;
		entry = bpf_map_lookup_elem(&cfg, &key);
		if (entry && *entry && (*entry >> 16) == sport)
			slot1 = *entry & 0xffff;
	}
	if (!slot1) {
		key = 2;
		entry = bpf_map_lookup_elem(&cfg, &key);
		if (entry && *entry && (ctx->hash & 0xffff) < (*entry >> 16))
			slot1 = *entry & 0xffff;
	}
	if (!slot1) {
		key = 0;
		entry = bpf_map_lookup_elem(&cfg, &key);
		if (!entry)
			return SK_PASS;
		slot1 = *entry;
	}
	if (slot1) {
		__u32 slot = slot1 - 1;
		/* An empty slot (its socket closed) fails the select: the kernel falls back
		 * to its own hash selection, so nothing is dropped. */
		bpf_sk_select_reuseport(ctx, &socks, &slot, 0);
	}
	return SK_PASS;
}

char _license[] SEC("license") = "GPL";
