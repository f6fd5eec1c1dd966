// The cluster line of the Control panel: one instance owning every
// partition, or the group with each member's partitions (GET /api/v1/cluster).

import { get } from './api.js';
import { $, h, setText } from './format.js';

function ranges(partitions) {
  return partitions.length ? partitions.join(', ') : 'none';
}

export function createCluster() {
  const box = $('cluster-view');

  function render(view) {
    if (!view.scale_out) {
      setText(box, 'Single instance: it owns every partition.');
      return;
    }
    if (view.state !== 'stable') {
      setText(box, `Group ${view.group}: ${view.state} (owns nothing until the group is stable).`);
      return;
    }
    box.replaceChildren(
      h('span', {}, `Group ${view.group}, generation ${view.generation}, ${view.members.length} members:`),
      h('ul', { class: 'cluster-members' }, ...view.members.map((m) =>
        h('li', { class: m.id === view.self ? 'self' : '' },
          h('a', { href: m.url, class: 'mono' }, m.url),
          ` partitions ${ranges(m.partitions)}`,
          m.state ? `, ${m.state.replace('_', ' ')}` : '',
          m.completed_per_second != null ? `, ${Math.round(m.completed_per_second)} completed/s` : '',
          m.id === view.self ? ' (this instance)' : ''))),
    );
  }

  return {
    async refresh() {
      try {
        render(await get('/api/v1/cluster'));
      } catch {
        setText(box, 'Cluster: not reachable.');
      }
    },
  };
}
