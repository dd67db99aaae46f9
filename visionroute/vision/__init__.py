"""The vision_api route's machinery: providers (google, aws, azure, local) behind one interface, and the
runner that sends images to them at quota speed with retries and a result cache."""
